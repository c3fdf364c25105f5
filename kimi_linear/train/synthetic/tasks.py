"""The three synthetic tasks of the Kimi Linear technical report (section 5.1, Figure 4), generated on the fly.

Every task makes batches `(input_ids, labels)`, both int64 [B, T]: `labels[b, t]` is the token the model must
predict from `input_ids[b, :t + 1]` (the training call's aligned labels), -100 everywhere but the answer
tokens, so the loss and the accuracy count the answers only. A batch is a pure function of the task's
parameters, (B, T) and the `torch.Generator` it draws from (CPU, so a seed gives the same data on any machine).

- `Palindrome`: n = T / 2 random symbols, a separator, then the same symbols in reverse order; the answers are
  the reversed half (predicted from the separator on).
- `MQAR`: multi-query associative recall as Zoology defines it (Arora, Eyuboglu et al. 2023,
  `zoology/data/multiquery_ar.py`): `num_kv_pairs` key-value pairs (keys from the lower half of the vocabulary,
  values from the upper half, distinct within a sequence) at the start, then each key queried once at an even
  offset of the rest drawn by a power law (`power_a`, nearer offsets likelier), the other positions random
  tokens; the answer, at the query key's position, is its value. By default the pairs grow with the length
  (T / 16), so longer sequences also hold more to recall. The vocabulary is 1024 by default (Zoology's is
  8192): on the H200 grid (docs/synthetic) 1024 lets both linear mixers learn MQAR at 256 tokens in 400-1000
  steps, while with 8192 no mixer left the uniform-guess plateau (loss ln 4096) at any length in the same
  budget (1,000-2,000 steps). The cost of the small vocabulary: the random tokens between the queries are
  drawn from all of it, so they repeat the sequence's own keys, each repeat followed by a random token that a
  recurrent memory stores in place of the key's value (before its query, at 256 / 512 / 1024 / 2048 tokens:
  5 / 10 / 19 / 37% of the keys with 1024 tokens; 0.6 / 1 / 2 / 5% with 8192).
- `Stack`: `num_stacks` independent LIFO stacks driven by (operation, value) token pairs: `PUSH_s v` pushes v on
  stack s; `POP_s v` pops stack s, whose top was v: the answer, predicted at the POP_s token. A pop is drawn
  with probability `pop_prob` when some stack is non-empty, always from a non-empty stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


def _rng(gen: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from `gen` (advances `gen`), for the loops torch has no batched form of."""
    return np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))


def _check_len(name: str, seq_len: int, minimum: int) -> None:
    if seq_len < minimum or seq_len % 2:
        raise ValueError(f"{name}: seq_len must be even and at least {minimum}, got {seq_len}")


@dataclass(frozen=True)
class Palindrome:
    """Copy n = T / 2 random symbols in reverse order after a separator."""

    num_symbols: int = 64
    name: str = "palindrome"

    SEP = 1
    FIRST_SYMBOL = 2

    @property
    def vocab_size(self) -> int:
        return self.FIRST_SYMBOL + self.num_symbols

    def generate(self, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_len("palindrome", seq_len, 4)
        n = seq_len // 2
        x = torch.randint(self.FIRST_SYMBOL, self.vocab_size, (batch, n), generator=gen)
        seq = torch.cat([x, torch.full((batch, 1), self.SEP), x.flip(1)], dim=1)  # [B, 2n + 1]
        input_ids, targets = seq[:, :-1], seq[:, 1:]
        labels = torch.full_like(targets, IGNORE)
        labels[:, n:] = targets[:, n:]  # from the separator on, each next token is the next reversed symbol
        return input_ids.contiguous(), labels


@dataclass(frozen=True)
class MQAR:
    """Zoology's multi-query associative recall (one pass over the pairs, random non-query tokens)."""

    vocab: int = 1024
    num_kv_pairs: int | None = None  # None: seq_len // 16
    power_a: float = 0.01
    name: str = "mqar"

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def pairs(self, seq_len: int) -> int:
        return self.num_kv_pairs if self.num_kv_pairs is not None else max(seq_len // 16, 1)

    def generate(self, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_len("mqar", seq_len, 4)
        num_kv = self.pairs(seq_len)
        if 4 * num_kv > seq_len:
            raise ValueError(f"mqar: {num_kv} key-value pairs need seq_len >= {4 * num_kv}, got {seq_len}")
        if self.vocab // 2 - 1 < num_kv:
            raise ValueError(f"mqar: vocab {self.vocab} is too small for {num_kv} distinct keys")
        half = self.vocab // 2
        # distinct keys in [1, half) and values in [half, vocab) per sequence: the first num_kv of a random order
        keys = torch.rand(batch, half - 1, generator=gen).argsort(dim=1)[:, :num_kv] + 1
        values = torch.rand(batch, self.vocab - half, generator=gen).argsort(dim=1)[:, :num_kv] + half
        context = 2 * num_kv
        kvs = torch.empty(batch, context, dtype=torch.int64)
        kvs[:, 0::2], kvs[:, 1::2] = keys, values
        space = (seq_len - context) // 2
        p = self.power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (self.power_a - 1)
        gaps = torch.multinomial((p / p.sum()).expand(batch, space), num_kv, replacement=False, generator=gen)
        queries = torch.zeros(batch, seq_len - context + 1, dtype=torch.int64)
        queries.scatter_(1, 2 * gaps, keys)
        examples = torch.cat([kvs, queries], dim=1)  # [B, T + 1]
        full_labels = torch.full((batch, seq_len + 1), IGNORE, dtype=torch.int64)
        full_labels.scatter_(1, 2 * gaps + context + 1, values)
        input_ids, labels = examples[:, :-1].clone(), full_labels[:, 1:].clone()
        noise = torch.randint(0, self.vocab, input_ids.shape, generator=gen)
        zero = input_ids == 0
        input_ids[zero] = noise[zero]
        return input_ids, labels


@dataclass(frozen=True)
class Stack:
    """Track `num_stacks` LIFO stacks; answer each pop with the value on top of its stack."""

    num_stacks: int = 64
    num_values: int = 256
    pop_prob: float = 0.5
    name: str = "stack"

    @property
    def vocab_size(self) -> int:
        return 2 * self.num_stacks + self.num_values

    def push_token(self, s):
        return s

    def pop_token(self, s):
        return self.num_stacks + s

    def value_token(self, v):
        return 2 * self.num_stacks + v

    def generate(self, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_len("stack", seq_len, 2)
        rng = _rng(gen)
        num_ops, S = seq_len // 2, self.num_stacks
        ops = np.empty((batch, num_ops), dtype=np.int64)
        vals = np.empty((batch, num_ops), dtype=np.int64)
        is_pop = np.zeros((batch, num_ops), dtype=bool)
        store = np.zeros((batch, S, num_ops), dtype=np.int64)  # store[b, s, :depth[b, s]] is stack s, top last
        depth = np.zeros((batch, S), dtype=np.int64)
        rows = np.arange(batch)
        want_pop = rng.random((batch, num_ops)) < self.pop_prob
        push_stack = rng.integers(0, S, (batch, num_ops))
        push_val = rng.integers(0, self.num_values, (batch, num_ops))
        pick = rng.random((batch, num_ops))
        for t in range(num_ops):
            nonempty = depth > 0
            count = nonempty.sum(1)
            pop = want_pop[:, t] & (count > 0)
            # a pop takes a uniformly random non-empty stack: the k-th non-empty one, k = floor(u * count)
            k = np.minimum((pick[:, t] * count).astype(np.int64), np.maximum(count - 1, 0))
            pop_stack = np.argmax(np.cumsum(nonempty, 1) > k[:, None], axis=1)
            s = np.where(pop, pop_stack, push_stack[:, t])
            d = depth[rows, s]
            top = store[rows, s, np.maximum(d - 1, 0)]
            v = np.where(pop, top, push_val[:, t])
            store[rows[~pop], s[~pop], d[~pop]] = v[~pop]
            depth[rows, s] = d + np.where(pop, -1, 1)
            ops[:, t], vals[:, t], is_pop[:, t] = s, v, pop
        tokens = np.empty((batch, seq_len), dtype=np.int64)
        tokens[:, 0::2] = np.where(is_pop, self.pop_token(ops), self.push_token(ops))
        tokens[:, 1::2] = self.value_token(vals)
        labels = np.full((batch, seq_len), IGNORE, dtype=np.int64)
        labels[:, 0::2] = np.where(is_pop, self.value_token(vals), IGNORE)  # at POP_s: predict the popped value
        return torch.from_numpy(tokens), torch.from_numpy(labels)


TASKS = {"palindrome": Palindrome, "mqar": MQAR, "stack": Stack}


def make_task(name: str, mqar_vocab: int | None = None, mqar_pairs: int | None = None):
    """The task `name` with its defaults (MQAR's vocabulary `mqar_vocab` and its key-value pairs per sequence
    `mqar_pairs` when given; by default the pairs are T / 16)."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {', '.join(TASKS)}")
    if name == "mqar":
        return MQAR(**({} if mqar_vocab is None else {"vocab": mqar_vocab}), num_kv_pairs=mqar_pairs)
    return TASKS[name]()
