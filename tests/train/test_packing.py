"""PackedLoader / EvalLoader: row layout, labels, epoch coverage, rank sharding, exact resume, determinism.

Documents are synthetic with globally unique token ids (document i holds ids 1000 * (i + 1) + t), so
every token in a row can be traced back to its document and position.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from kimi_linear.errors import DataError
from kimi_linear.train.data import Document
from kimi_linear.train.packing import IGNORE_INDEX, EvalLoader, PackedLoader, build_row, pack_greedy

PAD = 7
SEQ = 32


def make_docs(n: int = 23, seq_len: int = SEQ, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.randint(1, seq_len)
        ids = [1000 * (i + 1) + t for t in range(length)]
        mask = [False] + [rng.random() < 0.7 for _ in range(length - 1)]  # chat-like holes in the loss
        docs.append(Document(ids, mask))
    return docs


def doc_of(token: int) -> int:
    return token // 1000 - 1


def segments(row):
    cu = row.cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def check_row(row, docs, seq_len=SEQ):
    """Layout and labels of one row against the documents it holds; returns their indices."""
    assert row.input_ids.shape == (1, seq_len) and row.input_ids.dtype == torch.int64
    assert row.labels.shape == (1, seq_len) and row.labels.dtype == torch.int64
    assert row.cu_seqlens.dtype == torch.int32 and row.cu_seqlens.dim() == 1
    cu = row.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == seq_len and all(a < b for a, b in zip(cu, cu[1:]))
    ids, labels = row.input_ids[0].tolist(), row.labels[0].tolist()
    held = []
    for a, b in segments(row):
        if ids[a] == PAD:  # the pad tail: last, all pad, no loss
            assert b == seq_len and set(ids[a:b]) == {PAD} and set(labels[a:b]) == {IGNORE_INDEX}
            continue
        d = doc_of(ids[a])
        doc = docs[d]
        assert ids[a:b] == doc.input_ids, "a segment is exactly one whole document"
        expect = [doc.input_ids[t + 1] if doc.loss_mask[t + 1] else IGNORE_INDEX for t in range(len(doc) - 1)]
        assert labels[a:b] == expect + [IGNORE_INDEX]
        held.append(d)
    assert row.num_loss_tokens == sum(lab != IGNORE_INDEX for lab in labels)
    assert row.num_loss_tokens == sum(docs[d].num_loss_tokens for d in held)
    assert row.num_tokens == sum(len(docs[d]) for d in held)
    return held


def stream(loader, steps):
    return [next(loader) for _ in range(steps)]


def same_rows(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
                                    and torch.equal(x.cu_seqlens, y.cu_seqlens) for x, y in zip(a, b))


# --------------------------------------------------------------------------- rows
def test_row_layout_and_labels():
    docs = make_docs()
    loader = PackedLoader(docs, SEQ, rows_per_step=3, pad_token_id=PAD)
    for batch in stream(loader, 5):
        assert len(batch) == 3
        for row in batch:
            check_row(row, docs)


def test_full_row_has_no_pad_segment():
    docs = [Document([1000 + t for t in range(10)], [False] + [True] * 9),
            Document([2000 + t for t in range(6)], [False] + [True] * 5)]
    row = build_row(docs, 16, PAD)
    assert row.cu_seqlens.tolist() == [0, 10, 16]
    assert row.labels[0, 9].item() == IGNORE_INDEX and row.labels[0, 15].item() == IGNORE_INDEX
    assert row.num_loss_tokens == 9 + 5 and row.num_tokens == 16
    padded = build_row(docs[:1], 16, PAD)
    assert padded.cu_seqlens.tolist() == [0, 10, 16] and padded.input_ids[0, 10:].tolist() == [PAD] * 6


def test_greedy_next_fit():
    lengths = [5, 4, 8, 3, 3, 2, 8]
    rows = pack_greedy(lengths, range(len(lengths)), 10)
    assert rows == [[0, 1], [2], [3, 4, 5], [6]]
    for r, nxt in zip(rows, rows[1:]):  # a row is closed only when the next document does not fit
        assert sum(lengths[i] for i in r) + lengths[nxt[0]] > 10


def test_every_document_once_per_epoch():
    docs = make_docs(31)
    loader = PackedLoader(docs, SEQ, rows_per_step=1, pad_token_id=PAD, seed=3)
    for epoch in range(3):
        n_rows = len(loader.epoch_rows(epoch))
        held = Counter(d for [row] in stream(loader, n_rows) for d in check_row(row, docs))
        assert held == Counter(range(len(docs))), f"epoch {epoch}"
        assert (loader.epoch, loader.row) == (epoch + 1, 0)


def test_steps_straddle_epochs_without_losing_rows():
    docs = make_docs(17)
    loader = PackedLoader(docs, SEQ, rows_per_step=5, pad_token_id=PAD, seed=1)
    n0, n1 = len(loader.epoch_rows(0)), len(loader.epoch_rows(1))
    rows = [row for batch in stream(loader, -(-(n0 + n1) // 5)) for row in batch]
    held0 = Counter(d for row in rows[:n0] for d in check_row(row, docs))
    held1 = Counter(d for row in rows[n0:n0 + n1] for d in check_row(row, docs))
    assert held0 == held1 == Counter(range(len(docs)))


# --------------------------------------------------------------------------- determinism
def test_deterministic_by_seed_and_reshuffled_per_epoch():
    docs = make_docs()
    a = PackedLoader(docs, SEQ, 2, seed=5, pad_token_id=PAD)
    b = PackedLoader(docs, SEQ, 2, seed=5, pad_token_id=PAD)
    c = PackedLoader(docs, SEQ, 2, seed=6, pad_token_id=PAD)
    sa, sb, sc = stream(a, 6), stream(b, 6), stream(c, 6)
    assert all(same_rows(x, y) for x, y in zip(sa, sb))
    assert not all(same_rows(x, y) for x, y in zip(sa, sc))
    assert a.epoch_rows(0) != a.epoch_rows(1)


def test_no_shuffle_keeps_file_order():
    docs = make_docs(12)
    loader = PackedLoader(docs, SEQ, 1, shuffle=False, pad_token_id=PAD)
    order = [d for [row] in stream(loader, len(loader.epoch_rows(0))) for d in check_row(row, docs)]
    assert order == list(range(12))
    assert loader.epoch_rows(0) == loader.epoch_rows(1)


# --------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world_size, rows_per_step", [(2, 1), (3, 2), (4, 3)])
def test_sharding_disjoint_and_complete(world_size, rows_per_step):
    docs = make_docs(29)
    steps = 7
    single = stream(PackedLoader(docs, SEQ, rows_per_step * world_size, seed=2, pad_token_id=PAD), steps)
    ranks = [stream(PackedLoader(docs, SEQ, rows_per_step, rank=r, world_size=world_size, seed=2,
                                 pad_token_id=PAD), steps) for r in range(world_size)]
    for s in range(steps):
        together = [row for r in range(world_size) for row in ranks[r][s]]
        assert all(len(ranks[r][s]) == rows_per_step for r in range(world_size))
        # rank r holds exactly the r-th slice of the single rank's rows (so the ranks' rows are disjoint)
        assert same_rows(together, single[s]), f"step {s}: the ranks' rows are not the single rank's rows"


def test_sharded_ranks_cover_each_epoch_once():
    docs = make_docs(40)
    world_size = 3
    loaders = [PackedLoader(docs, SEQ, 1, rank=r, world_size=world_size, seed=4, pad_token_id=PAD)
               for r in range(world_size)]
    n_rows = len(loaders[0].epoch_rows(0))
    steps = n_rows // world_size
    held = Counter(d for ld in loaders for [row] in stream(ld, steps) for d in check_row(row, docs))
    served = [d for r in loaders[0].epoch_rows(0)[:steps * world_size] for d in r]
    assert held == Counter(served) and max(held.values()) == 1


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_resume_exact(k):
    docs = make_docs(19)
    total = 12  # crosses epoch boundaries (about 12 rows an epoch, 2 a step)
    kwargs = dict(seq_len=SEQ, rows_per_step=2, seed=11, pad_token_id=PAD)
    full = stream(PackedLoader(docs, **kwargs), total)
    first = PackedLoader(docs, **kwargs)
    stream(first, k)
    state = first.state_dict()
    resumed = PackedLoader(docs, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.step == k
    rest = stream(resumed, total - k)
    assert all(same_rows(x, y) for x, y in zip(full[k:], rest))
    as_tensors = PackedLoader(docs, **kwargs)  # a checkpoint may hand the values back as 0-d tensors
    as_tensors.load_state_dict({key: torch.tensor(v) for key, v in state.items()})
    assert same_rows(next(as_tensors), rest[0])


def test_resume_with_another_world_size():
    docs = make_docs(19)
    one = PackedLoader(docs, SEQ, 4, seed=1, pad_token_id=PAD)
    full = stream(one, 5)
    early = PackedLoader(docs, SEQ, 4, seed=1, pad_token_id=PAD)
    stream(early, 2)
    state = early.state_dict()
    halves = []
    for r in range(2):
        ld = PackedLoader(docs, SEQ, 2, rank=r, world_size=2, seed=1, pad_token_id=PAD)
        ld.load_state_dict(state)
        halves.append(stream(ld, 3))
    for s in range(3):
        assert same_rows(halves[0][s] + halves[1][s], full[2 + s])


def test_resume_refuses_other_data_or_settings():
    docs = make_docs(19)
    state = PackedLoader(docs, SEQ, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed differs"):
        PackedLoader(docs, SEQ, 2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="documents differ"):
        PackedLoader(make_docs(19, seed=9), SEQ, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len differs"):
        PackedLoader(docs, SEQ + 1, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="does not exist"):
        PackedLoader(docs, SEQ, 2, seed=1).load_state_dict({**state, "row": 10_000})


# --------------------------------------------------------------------------- eval
@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_one_pass_in_order_padded_steps(world_size):
    docs = make_docs(21)
    loaders = [EvalLoader(docs, SEQ, 2, rank=r, world_size=world_size, pad_token_id=PAD) for r in range(world_size)]
    steps = [list(ld) for ld in loaders]
    assert all(len(s) == len(loaders[0]) for s in steps)
    order = []
    for s in range(len(loaders[0])):
        for r in range(world_size):
            assert len(steps[r][s]) == 2
            for row in steps[r][s]:
                order += check_row(row, docs)
    assert order == list(range(21))  # every document once, in file order
    assert list(loaders[0])[0][0].input_ids.equal(steps[0][0][0].input_ids)  # a pass can be repeated
    empties = [row for s in steps for b in s for row in b if row.num_tokens == 0]
    assert all(row.num_loss_tokens == 0 and row.cu_seqlens.tolist() == [0, SEQ] for row in empties)


# --------------------------------------------------------------------------- errors
def test_bad_arguments():
    docs = make_docs(5)
    with pytest.raises(DataError, match="document 0 has 33 tokens"):
        PackedLoader([Document(list(range(33)), [True] * 33)], SEQ, 1)
    with pytest.raises(DataError, match="rank 2 is not in a world of 2"):
        PackedLoader(docs, SEQ, 1, rank=2, world_size=2)
    with pytest.raises(DataError, match="no documents"):
        PackedLoader([], SEQ, 1)
    with pytest.raises(DataError, match="rows_per_step"):
        EvalLoader(docs, SEQ, 0)
