"""Mixed prefill + decode batches (issue 16, item 8): the decode rows take the decode kernels (fused
recurrent KDA, the one-launch decode conv, absorbed MLA) and the prefill rows the chunked ones, in one
forward, and every row computes what it computes through the all-chunked path and alone.

The flat batches here are built by hand over a `ModelCache` whose state slots and latent blocks are
scattered (not slot n for row n) and whose unused slots and blocks hold NaN, so reading a wrong slot or a
wrong block shows. Rows: decodes with contexts of different lengths (their conv windows full), prefill
chunks continuing a cached context, fresh prefills, in the engine's order (decodes first) and
interleaved. Naive ops, then the kernels under the Triton interpreter (tiny shapes).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kimi_linear import KimiLinearForCausalLM, SequenceCache
from kimi_linear.models import ForwardContext
from kimi_linear.ops import kda as kda_ops

BLOCK = 4
NUM_BLOCKS = 64
NUM_SLOTS = 12
MAX_LEN = 24  # blocks per sequence: MAX_LEN // BLOCK


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)


class FlatCache:
    """A ModelCache driven by hand: each sequence owns a scattered state slot and scattered blocks."""

    def __init__(self, model, num_seqs: int, gen: torch.Generator):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = model.make_cache(NUM_BLOCKS, BLOCK, NUM_SLOTS, self.device, torch.float32)
        for t in self.cache.tensors:  # unused slots and blocks are NaN: a wrong read shows
            for x in (t if isinstance(t, tuple) else (t,)):
                x.fill_(float("nan"))
        self.slots = torch.randperm(NUM_SLOTS, generator=gen)[:num_seqs].tolist()
        blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        per = MAX_LEN // BLOCK
        self.tables = [blocks[i * per:(i + 1) * per] for i in range(num_seqs)]  # NaN until written
        self.lengths = [0] * num_seqs
        self.cache.reset_slots(self.slots)

    def context(self, rows: list[int], query_lens: list[int], split: bool = True) -> ForwardContext:
        cu, slots, seq_lens = [0], [], []
        for r, q in zip(rows, query_lens):
            cu.append(cu[-1] + q)
            start = self.lengths[r]
            slots.extend(self.tables[r][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + q))
            seq_lens.append(start + q)
        width = max(len(self.tables[r]) for r in rows)

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        return ForwardContext(
            cu_seqlens=t(cu, torch.int32), query_lens=list(query_lens),
            context_lens=[self.lengths[r] for r in rows], is_decode=all(q == 1 for q in query_lens),
            cache=self.cache, state_indices=t([self.slots[r] for r in rows], torch.int32),
            slot_mapping=t(slots, torch.int64), block_tables=t([self.tables[r][:width] for r in rows], torch.int32),
            seq_lens=t(seq_lens, torch.int32), max_seq_len=max(seq_lens), split_decodes=split)

    def step(self, rows: list[int], tokens: list[torch.Tensor], split: bool = True) -> torch.Tensor:
        ctx = self.context(rows, [t.numel() for t in tokens], split)
        hidden = self.model.forward_flat(torch.cat(tokens).to(self.device), ctx)
        for r, t in zip(rows, tokens):
            self.lengths[r] += t.numel()
        return self.model.compute_logits(hidden)

    def state_of(self, r: int) -> list[torch.Tensor]:
        """Sequence r's slot tensors and its cached latents (in token order)."""
        out = [x[self.slots[r]] for x in self.cache.slot_tensors()]
        for i in self.cache.paged_layers():
            t = self.cache.tensors[i]
            out.append(t[self.tables[r]].reshape(-1, t.shape[-1])[:self.lengths[r]])
        return out


# sequence r: its prompt length before the mixed step, and what the mixed step computes for it
PROMPTS = [9, 21, 0, 6, 14, 0]  # 0 = fresh: the mixed step is its first chunk
STEP = [1, 1, 7, 11, 1, 1]  # 1 on a cached context = a decode row; row 5 is a fresh one-token prompt
ORDERS = {"decodes first": [0, 1, 4, 5, 3, 2], "interleaved": [3, 0, 2, 1, 5, 4]}


def _setup(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    ids = [torch.randint(0, V, (p + s,), generator=gen) for p, s in zip(PROMPTS, STEP)]
    fc = FlatCache(model, len(PROMPTS), gen)
    cached = [r for r, p in enumerate(PROMPTS) if p]
    fc.step(cached, [ids[r][:PROMPTS[r]] for r in cached])  # a prefill of the cached contexts (conv windows full)
    return fc, ids


def _mixed(model, order, split: bool, seed: int = 0, before_step=None):
    fc, ids = _setup(model, seed)
    if before_step is not None:
        before_step()
    logits = fc.step(order, [ids[r][PROMPTS[r]:] for r in order], split=split)
    rows, t = {}, 0
    for r in order:
        rows[r] = logits[t:t + STEP[r]]
        t += STEP[r]
    return rows, {r: fc.state_of(r) for r in order}, ids


def _alone(model, ids_r: torch.Tensor, prompt: int) -> torch.Tensor:
    """The sequence by itself through a SequenceCache: its prompt, then the mixed step's tokens."""
    cache = SequenceCache(model.config, 1, block_size=BLOCK)
    if prompt:
        model(ids_r[None, :prompt], cache)
    return model(ids_r[None, prompt:], cache)[0]


def _check(model, order):
    split, split_state, ids = _mixed(model, order, True)
    chunked, chunked_state, _ = _mixed(model, order, False)
    for r in order:
        kind = "decode" if STEP[r] == 1 else "prefill"
        assert_close(f"row {r} ({kind}): split vs all-chunked logits", chunked[r], split[r], 1e-5)
        assert_close(f"row {r} ({kind}): split vs alone", _alone(model, ids[r], PROMPTS[r]), split[r], 1e-5)
        for i, (a, b) in enumerate(zip(chunked_state[r], split_state[r])):
            assert_close(f"row {r} ({kind}): cache tensor {i} after the step", a, b, 1e-5)


@torch.no_grad()
@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
def test_mixed_batch_rows_equal_all_chunked_and_alone(model, order, monkeypatch):
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
    _check(model, ORDERS[order])


@torch.no_grad()
def test_mixed_batch_kernel_path(model, monkeypatch):
    """The same under the Triton interpreter: fused recurrent + decode conv on the decode rows, chunk_kda
    and the prefill kernels on the others, absorbed MLA decode beside MHA prefill (the rows alone are the
    naive test's: the kernel path's prefill then decode equals the naive one, tests/models/test_kernel_path.py)."""
    pytest.importorskip("triton")

    def kernels():  # the cached contexts are prefilled naively (same states), the mixed step on the kernels
        monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")

    def naive():
        monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")

    naive()
    split, split_state, _ = _mixed(model, ORDERS["decodes first"], True, before_step=kernels)
    naive()
    chunked, chunked_state, _ = _mixed(model, ORDERS["decodes first"], False, before_step=kernels)
    for r in ORDERS["decodes first"]:
        kind = "decode" if STEP[r] == 1 else "prefill"
        assert_close(f"kernels, row {r} ({kind}): split vs all-chunked logits", chunked[r], split[r], 1e-5)
        for i, (a, b) in enumerate(zip(chunked_state[r], split_state[r])):
            assert_close(f"kernels, row {r} ({kind}): cache tensor {i} after the step", a, b, 1e-5)


def test_row_runs_cut_by_kind(model):
    gen = torch.Generator().manual_seed(0)
    fc = FlatCache(model, 6, gen)
    fc.lengths = [3, 3, 3, 3, 3, 3]
    ctx = fc.context([0, 1, 2, 3, 4, 5], [1, 1, 5, 2, 1, 1])
    runs = ctx.row_runs()
    assert [(t0, t1, sub.is_decode, sub.query_lens) for t0, t1, sub in runs] == [
        (0, 2, True, [1, 1]), (2, 9, False, [5, 2]), (9, 11, True, [1, 1])]
    mid = runs[1][2]
    assert mid.cu_seqlens.tolist() == [0, 5, 7]
    assert mid.state_indices.tolist() == ctx.state_indices[2:4].tolist()
    assert torch.equal(mid.slot_mapping, ctx.slot_mapping[2:9])
    assert mid.seq_lens.tolist() == [8, 5] and mid.max_seq_len == 8
    assert ctx.row_runs() is runs  # computed once per context
    assert len(fc.context([0, 2], [1, 5], split=False).row_runs()) == 1
    assert len(fc.context([2, 3], [5, 2]).row_runs()) == 1  # pure prefill: the context itself


@torch.no_grad()
def test_decode_rows_no_longer_go_through_chunk_kda(model, monkeypatch):
    """Regression (issue 16, item 8): the chunked KDA op used to get every token of a mixed batch; now it
    gets the prefill rows' tokens only, and the decode rows go to the fused recurrent op."""
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
    fc, ids = _setup(model, 0)
    calls = {"chunk": [], "recurrent": []}

    def counting(name, fn):
        def wrapper(q, *args, **kwargs):
            calls[name].append(q.shape[0] * q.shape[1])  # tokens: [1, T] chunked, [T, 1] decode rows
            return fn(q, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(kda_ops, "chunk_kda", counting("chunk", kda_ops.chunk_kda))
    monkeypatch.setattr(kda_ops, "fused_recurrent_kda", counting("recurrent", kda_ops.fused_recurrent_kda))
    order = ORDERS["decodes first"]
    fc.step(order, [ids[r][PROMPTS[r]:] for r in order])
    num_kda = sum(1 for s in fc.cache.specs if s is not None and not s.paged)
    decode_tokens = sum(1 for r in order if STEP[r] == 1)
    prefill_tokens = sum(STEP[r] for r in order if STEP[r] > 1)
    assert calls["chunk"] == [prefill_tokens] * num_kda
    assert calls["recurrent"] == [decode_tokens] * num_kda


@torch.no_grad()
def test_engine_tokens_equal_with_and_without_the_split(tiny_checkpoint, monkeypatch):
    """Greedy tokens of an engine run with mixed steps (decodes beside prefill chunks) are the same whether
    the decode rows take the decode kernels or the chunked path."""
    from kimi_linear import LLM, SamplingParams

    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "0")
    llm = LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_num_batched_tokens=16, max_num_seqs=8,
              enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 700, (n,), generator=gen).tolist() for n in (5, 30, 3, 20)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    model = llm.llm_engine.runner.model
    forward_flat = model.forward_flat
    seen = {"mixed": 0}

    def unsplit(ids, ctx):
        if not ctx.is_decode and len(set(q == 1 for q in ctx.query_lens)) == 2:
            seen["mixed"] += 1
        ctx.split_decodes = False
        return forward_flat(ids, ctx)

    split = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
    monkeypatch.setattr(model, "forward_flat", unsplit)
    chunked = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
    assert seen["mixed"] > 0, "the run had no mixed step"
    assert split == chunked


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_mixed_batch_split_equals_all_chunked_and_cpu(tiny_checkpoint, model):
    """On CUDA (the kernels, eager mixed path): the split rows equal the all-chunked rows and the CPU naive rows."""
    gpu = KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32, progress=False)
    order = ORDERS["decodes first"]
    split, split_state, _ = _mixed(gpu, order, True)
    chunked, chunked_state, _ = _mixed(gpu, order, False)
    ref, _, _ = _mixed(model, order, True)
    for r in order:
        kind = "decode" if STEP[r] == 1 else "prefill"
        assert_close(f"GPU row {r} ({kind}): split vs all-chunked", chunked[r].cpu(), split[r].cpu(), 1e-3)
        assert_close(f"GPU row {r} ({kind}): split vs CPU naive", ref[r], split[r].cpu(), 1e-3)
        for i, (a, b) in enumerate(zip(chunked_state[r], split_state[r])):
            assert_close(f"GPU row {r} ({kind}): cache tensor {i}", a.cpu(), b.cpu(), 1e-3)
