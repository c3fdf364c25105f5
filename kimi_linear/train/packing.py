"""Packing documents into fixed-length rows, sharded over data-parallel ranks, resumable exactly.

- Rows: the documents of an epoch, in a seeded shuffled order (a permutation drawn from
  `numpy.random.default_rng([seed, epoch])`), are packed greedily: each goes into the current row if it
  fits, else it starts the next row (next-fit; a document is never split: `load_documents(max_tokens=
  seq_len)` guarantees each fits). The unused tail of a row is pad tokens forming one extra segment.
- `PackedRow`: `input_ids` [1, L] int64, `labels` [1, L] int64, `cu_seqlens` int32 [D + 1] (each
  document's boundaries, then the pad segment if any; cu[0] = 0, cu[-1] = L). Labels are shifted within
  each document: labels[t] = input_ids[t + 1] when token t + 1 is a loss target (`Document.loss_mask`),
  else -100; a document's last token and every pad token get -100, so nothing is predicted across a
  boundary.
- The stream: the rows of epoch 0, then those of epoch 1 (reshuffled), and so on forever. Optimizer
  step s takes the next G = rows_per_step * world_size rows of the stream (a step may straddle two
  epochs); rank r gets rows [r * rows_per_step, (r + 1) * rows_per_step) of them. So the ranks' rows are
  disjoint and together equal the rows that one rank with rows_per_step * world_size would get, and every
  document appears exactly once per epoch.
- State: the position (epoch, row) of the next row of the stream, which does not depend on the rank or
  the world size; `state_dict()` after k steps and `load_state_dict()` on a fresh loader reproduce the
  rows of step k onwards exactly. The state records the seed, seq_len, shuffle and a fingerprint of the
  document lengths, so resuming on other data or settings is an error, not a silent divergence.
- `EvalLoader`: the documents in file order, packed the same way, one pass; the last step is filled up
  with empty rows (all pad, no loss) so every rank runs the same number of equal-sized steps.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kimi_linear.errors import DataError
from kimi_linear.train.data import Document

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    """One packed row of documents (the model's training call takes it as is)."""

    input_ids: torch.Tensor   # [1, L] int64
    labels: torch.Tensor      # [1, L] int64, IGNORE_INDEX where there is no loss
    cu_seqlens: torch.Tensor  # [D + 1] int32: document boundaries, the pad tail its own segment
    num_loss_tokens: int      # labels != IGNORE_INDEX
    num_tokens: int = 0       # document tokens (the row minus its pad tail)


# --------------------------------------------------------------------------- rows
def pack_greedy(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Document indices of each row: `order` cut greedily into runs of total length <= seq_len."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if used + n > seq_len and current:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(current)
    return rows


def build_row(docs: Sequence[Document], seq_len: int, pad_token_id: int) -> PackedRow:
    """The row holding `docs` back to back (total length <= seq_len), padded to seq_len."""
    ids: list[int] = []
    mask: list[bool] = []
    cu = [0]
    for d in docs:
        ids += d.input_ids
        mask += d.loss_mask
        cu.append(len(ids))
    used = len(ids)
    if used > seq_len:
        raise DataError(f"a row of {used} tokens does not fit seq_len={seq_len}")
    if used < seq_len:
        ids += [pad_token_id] * (seq_len - used)
        mask += [False] * (seq_len - used)
        cu.append(seq_len)
    x = torch.tensor(ids, dtype=torch.int64)
    target = torch.tensor(mask, dtype=torch.bool)
    is_last = torch.zeros(seq_len, dtype=torch.bool)
    is_last[torch.tensor(cu[1:], dtype=torch.int64) - 1] = True  # the last token of each segment
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)
    keep = target[1:] & ~is_last[:-1]
    labels[:-1] = torch.where(keep, x[1:], IGNORE_INDEX)
    return PackedRow(x.view(1, seq_len), labels.view(1, seq_len), torch.tensor(cu, dtype=torch.int32),
                     int(keep.sum()), used)


def empty_row(seq_len: int, pad_token_id: int) -> PackedRow:
    """A row of pad tokens only (no loss): fills up the last step of an evaluation pass."""
    return build_row([], seq_len, pad_token_id)


def _check(docs: Sequence[Document], seq_len: int, rows_per_step: int, rank: int, world_size: int) -> None:
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    if rows_per_step < 1:
        raise DataError(f"rows_per_step must be at least 1, got {rows_per_step}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of {world_size} ranks")
    if not docs:
        raise DataError("no documents to pack")
    for i, d in enumerate(docs):
        if not 1 <= len(d) <= seq_len:
            raise DataError(f"document {i} has {len(d)} tokens; each must have 1..{seq_len} (seq_len)")


def _fingerprint(lengths: Sequence[int]) -> int:
    return zlib.crc32(np.asarray(lengths, dtype=np.int64).tobytes())


# --------------------------------------------------------------------------- training stream
class _RowSource:
    """What both loaders are configured with: the documents, the row shape and this rank's share."""

    def __init__(self, docs: Sequence[Document], seq_len: int, rows_per_step: int, rank: int, world_size: int,
                 pad_token_id: int):
        _check(docs, seq_len, rows_per_step, rank, world_size)
        self.docs = docs
        self.seq_len = seq_len
        self.rows_per_step = rows_per_step
        self.rank = rank
        self.world_size = world_size
        self.pad_token_id = pad_token_id


class PackedLoader(_RowSource):
    """`for batch in loader:` yields, per optimizer step, this rank's `rows_per_step` PackedRows, forever."""

    def __init__(self, docs: Sequence[Document], seq_len: int, rows_per_step: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, pad_token_id: int = 0):
        super().__init__(docs, seq_len, rows_per_step, rank, world_size, pad_token_id)
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = [len(d) for d in docs]
        self.fingerprint = _fingerprint(self.lengths)
        self.epoch = 0  # the stream position: row `row` of epoch `epoch` is the next one
        self.row = 0
        self.step = 0   # steps yielded since the start of the stream
        self._plans: dict[int, list[list[int]]] = {}

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Document indices of each row of `epoch` (the current and next epochs are cached)."""
        plan = self._plans.get(epoch)
        if plan is None:
            n = len(self.docs)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            plan = pack_greedy(self.lengths, order.tolist(), self.seq_len)
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = plan
        return plan

    def __iter__(self) -> Iterator[list[PackedRow]]:
        return self

    def __next__(self) -> list[PackedRow]:
        first = self.rank * self.rows_per_step
        mine: list[PackedRow] = []
        epoch, row = self.epoch, self.row
        for g in range(self.rows_per_step * self.world_size):
            plan = self.epoch_rows(epoch)
            if first <= g < first + self.rows_per_step:
                mine.append(build_row([self.docs[i] for i in plan[row]], self.seq_len, self.pad_token_id))
            row += 1
            if row == len(plan):
                epoch, row = epoch + 1, 0
        self.epoch, self.row = epoch, row
        self.step += 1
        return mine

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """The stream position plus what it depends on (plain ints and bools, rank-independent)."""
        return {"epoch": self.epoch, "row": self.row, "step": self.step, "seed": self.seed,
                "seq_len": self.seq_len, "shuffle": self.shuffle, "num_documents": len(self.docs),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()`, possibly of a run with another world size)."""
        mine = self.state_dict()
        state = {k: (v.item() if hasattr(v, "item") else v) for k, v in state.items()}  # 0-d tensors after DCP
        for key in ("seed", "seq_len", "shuffle", "num_documents", "fingerprint"):
            if key not in state:
                raise DataError(f"data loader state has no {key!r}")
            if state[key] != mine[key]:
                what = "the documents differ" if key in ("num_documents", "fingerprint") else f"{key} differs"
                raise DataError(f"cannot resume the data stream: {what} from the checkpoint's "
                                f"({key}: checkpoint {state[key]!r}, now {mine[key]!r})")
        epoch, row = int(state["epoch"]), int(state["row"])
        if epoch < 0 or not 0 <= row < len(self.epoch_rows(epoch)):
            raise DataError(f"data loader state points at row {row} of epoch {epoch}, which does not exist")
        self.epoch, self.row, self.step = epoch, row, int(state.get("step", 0))


# --------------------------------------------------------------------------- evaluation
class EvalLoader(_RowSource):
    """One pass over `docs` in order: `len(loader)` steps of `rows_per_step` rows for this rank each."""

    def __init__(self, docs: Sequence[Document], seq_len: int, rows_per_step: int, rank: int = 0,
                 world_size: int = 1, pad_token_id: int = 0):
        super().__init__(docs, seq_len, rows_per_step, rank, world_size, pad_token_id)
        self.rows = pack_greedy([len(d) for d in docs], range(len(docs)), seq_len)

    def __len__(self) -> int:
        per_step = self.rows_per_step * self.world_size
        return -(-len(self.rows) // per_step)

    def __iter__(self) -> Iterator[list[PackedRow]]:
        per_step = self.rows_per_step * self.world_size
        for s in range(len(self)):
            start = s * per_step + self.rank * self.rows_per_step
            batch = []
            for r in range(start, start + self.rows_per_step):
                if r < len(self.rows):
                    batch.append(build_row([self.docs[i] for i in self.rows[r]], self.seq_len, self.pad_token_id))
                else:
                    batch.append(empty_row(self.seq_len, self.pad_token_id))
            yield batch
