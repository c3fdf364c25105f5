"""Batched sampling on the device: one row of logits per sequence that produces a token this step.

`SamplingBatch.build(...)` turns the requests' SamplingParams (plus their prompt / output token ids
and the EOS ids, when a parameter needs them) into tensors once per step; `Sampler` then processes
the logits, vectorised over the batch, in vLLM's order:

1. raw logprobs: log_softmax of the unprocessed logits (fp32), as vLLM reports them by default, only when
   a row of the batch asks for logprobs (`SamplerOutput.logprobs` is None otherwise: a decode step at batch
   1 spends ~36 us on it over a 163,840-token vocabulary on the H200);
2. masks to -inf: the structured-output token bitmask, `allowed_token_ids`, `bad_words` (a word's last
   token when the output ends with the rest of it), and EOS / `stop_token_ids` before `min_tokens`
   (which ids, and until when, comes from `request.ids_to_mask`, the owner of the token-id stop rules);
3. `logit_bias` (added), then the penalties: repetition (prompt and output tokens; logits > 0 divided,
   others multiplied), frequency (minus penalty x output count), presence (minus penalty if in the output);
4. greedy rows take the argmax of those logits; random rows divide by temperature, apply min_p
   (drop tokens below min_p x the top probability), top-k, top-p, and draw with the exponential
   race (argmax of p / E, E ~ Exp(1)). A seeded request draws E from its own torch.Generator, so
   its tokens do not depend on the other rows of the batch or their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kimi_linear.engine.request import ids_to_mask
from kimi_linear.errors import ValidationError
from kimi_linear.models.cache import to_device
from kimi_linear.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] fp32, 1.0 for greedy rows (unused there)
    top_k: torch.Tensor  # [B] int64, vocab size = off
    top_p: torch.Tensor  # [B] fp32, 1.0 = off
    greedy: torch.Tensor  # [B] bool
    generators: list[torch.Generator | None]
    num_logprobs: int  # max top-logprobs requested in the batch; -1 = none requested
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    min_p: torch.Tensor | None = None  # [B] fp32 (None: no row uses it)
    repetition: torch.Tensor | None = None  # [B] fp32 (None: no penalties in the batch)
    frequency: torch.Tensor | None = None  # [B] fp32
    presence: torch.Tensor | None = None  # [B] fp32
    prompt_mask: torch.Tensor | None = None  # [B, V] bool, token occurs in the prompt
    output_counts: torch.Tensor | None = None  # [B, V] fp32, occurrences in the output so far
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, cols int64, values fp32
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, cols int64: set to -inf
    allowed: torch.Tensor | None = None  # [B, V] bool (rows without a restriction: all True)
    bitmask: torch.Tensor | None = None  # [B, ceil(V / 32)] int32 token bitmask (structured output)

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab_size: int,
              device: torch.device | str, *, prompt_token_ids: Sequence[Sequence[int]] | None = None,
              output_token_ids: Sequence[Sequence[int]] | None = None, eos_token_ids: Sequence[int] = (),
              bitmask: torch.Tensor | None = None) -> "SamplingBatch":
        """Tensors for rows `params` (one per sequence). `prompt_token_ids` / `output_token_ids` (per row)
        are needed by the penalties, bad_words and min_tokens; `bitmask` [B, ceil(V/32)] int32 comes
        from the structured-output backend (all bits set in rows without a grammar)."""
        V = vocab_size
        greedy = [p.greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        top_p = [p.top_p for p in params]
        lps = [p.logprobs for p in params if p.logprobs is not None]

        def f32(values):
            return to_device(values, torch.float32, device)

        batch = cls(
            temperature=f32(temps), top_k=to_device(top_k, torch.int64, device), top_p=f32(top_p),
            greedy=to_device(greedy, torch.bool, device), generators=list(generators),
            num_logprobs=max(lps) if lps else -1, all_greedy=all(greedy),
            use_top_k=any(k < V for k in top_k), use_top_p=any(p < 1.0 for p in top_p), bitmask=bitmask)
        if any(p.min_p > 0 and not g for p, g in zip(params, greedy)):
            batch.min_p = f32([p.min_p for p in params])

        def need(what: str, ids):
            if ids is None:
                raise ValueError(f"SamplingBatch.build: a request uses {what}, pass its token ids")
            return ids

        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            outs = need("penalties", output_token_ids)
            batch.repetition = f32([p.repetition_penalty for p in params])
            batch.frequency = f32([p.frequency_penalty for p in params])
            batch.presence = f32([p.presence_penalty for p in params])
            batch.output_counts = _bincount_rows(outs, V, device)
            if any(p.repetition_penalty != 1.0 for p in params):
                batch.prompt_mask = _bincount_rows(need("repetition_penalty", prompt_token_ids), V, device) > 0
        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for tok, b in (p.logit_bias or {}).items():
                _check_id(tok, V, "logit_bias")
                rows.append(i), cols.append(tok), vals.append(b)
        if rows:
            batch.bias = (_i64(rows, device), _i64(cols, device), f32(vals))
        rows, cols = [], []
        for i, p in enumerate(params):
            if p.min_tokens:
                for t in sorted(ids_to_mask(p, eos_token_ids, len(need("min_tokens", output_token_ids)[i]))):
                    if t < V:
                        rows.append(i), cols.append(t)
            for word in p.bad_words_token_ids or ():
                out = need("bad_words", output_token_ids)[i]
                prefix = word[:-1]
                if len(out) >= len(prefix) and list(out[len(out) - len(prefix):]) == list(prefix):
                    _check_id(word[-1], V, "bad_words")
                    rows.append(i), cols.append(word[-1])
        if rows:
            batch.banned = (_i64(rows, device), _i64(cols, device))
        if any(p.allowed_token_ids is not None for p in params):
            allowed = torch.ones(len(params), V, dtype=torch.bool, device=device)
            for i, p in enumerate(params):
                if p.allowed_token_ids is not None:
                    for t in p.allowed_token_ids:
                        _check_id(t, V, "allowed_token_ids")
                    allowed[i] = False
                    allowed[i, _i64(p.allowed_token_ids, device)] = True
            batch.allowed = allowed
        return batch


def _i64(values, device) -> torch.Tensor:
    return to_device(values, torch.int64, device)


def _check_id(tok: int, V: int, param: str) -> None:
    if not 0 <= tok < V:
        raise ValidationError(f"{param}: token id {tok} is out of the vocabulary (size {V})", param=param)


def _bincount_rows(ids: Sequence[Sequence[int]], V: int, device) -> torch.Tensor:
    """counts [B, V] fp32 of each row's token ids."""
    B, L = len(ids), max((len(r) for r in ids), default=0)
    padded = torch.full((B, max(L, 1)), V, dtype=torch.int64)
    for i, r in enumerate(ids):
        if len(r):
            padded[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.int64)
    padded = padded.to(device)
    counts = torch.zeros(B, V + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :V]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] fp32, raw logprob of the sampled token (None: no row asked)
    top_ids: torch.Tensor | None = None  # [B, K] int64
    top_logprobs: torch.Tensor | None = None  # [B, K] fp32
    ranks: torch.Tensor | None = None  # [B] int64, rank of the sampled token in the raw distribution (1 = top)


# --------------------------------------------------------------------------- logits processing
def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set to -inf the tokens whose bit is 0. logits [B, V]; bitmask [B, ceil(V/32)] int32 (bit j of word w
    = token 32 w + j). Returns a new tensor."""
    V = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.to(logits.device)[:, :, None] >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :V].bool()
    return logits.masked_fill(~allowed, _NEG_INF)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, vLLM semantics. [B, V]."""
    counts = batch.output_counts
    if batch.prompt_mask is not None:
        seen = batch.prompt_mask | (counts > 0)
        rep = torch.where(seen, batch.repetition[:, None], torch.ones_like(logits))
        logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - batch.frequency[:, None] * counts
    return logits - batch.presence[:, None] * (counts > 0).float()


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the row's top probability. logits [B, V] fp32."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k and top-p nucleus. logits [B, V] fp32."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    V = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(V, device=logits.device)[None, :]
        mask |= ranks >= top_k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(mask, _NEG_INF).softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        mask |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, _NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator | None],
                      device: torch.device) -> torch.Tensor:
    q = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return q


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The torch.Generator of a seeded sequence (seeds may be negative or up to 2**64 - 1)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed % (1 << 64))
    return g


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [B, V] (any float dtype) -> SamplerOutput. The input tensor is not modified."""
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs >= 0 else None
        logits = self.process(logits, batch)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            probs = self.probs(logits, batch)
            q = exponential_noise(tuple(probs.shape), batch.generators, probs.device)
            sampled = (probs / q).argmax(dim=-1)
            tokens = torch.where(batch.greedy, logits.argmax(dim=-1), sampled)
        if raw_logprobs is None:
            return SamplerOutput(token_ids=tokens, logprobs=None)
        lp = raw_logprobs.gather(1, tokens[:, None])[:, 0]
        out = SamplerOutput(token_ids=tokens, logprobs=lp)
        out.ranks = (raw_logprobs > lp[:, None]).sum(dim=-1) + 1
        if batch.num_logprobs > 0:
            top = raw_logprobs.topk(batch.num_logprobs, dim=-1)
            out.top_ids, out.top_logprobs = top.indices, top.values
        return out

    @staticmethod
    def process(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Masks, logit bias and penalties (what greedy rows take the argmax of). [B, V] fp32 -> new tensor."""
        if batch.bitmask is not None:
            logits = apply_token_bitmask(logits, batch.bitmask)
        if batch.allowed is not None:
            logits = logits.masked_fill(~batch.allowed, _NEG_INF)
        if batch.banned is not None:
            logits = logits.index_put(batch.banned, torch.full((), _NEG_INF, device=logits.device))
        if batch.bias is not None:
            rows, cols, vals = batch.bias
            logits = logits.index_put((rows, cols), vals, accumulate=True)
        if batch.output_counts is not None:
            logits = apply_penalties(logits, batch)
        return logits

    @staticmethod
    def probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution random rows draw from: temperature, min_p, top-k, top-p. [B, V] fp32."""
        x = logits / batch.temperature[:, None]
        if batch.min_p is not None:
            x = apply_min_p(x, batch.min_p)
        x = apply_top_k_top_p(x, batch.top_k if batch.use_top_k else None, batch.top_p if batch.use_top_p else None)
        return x.softmax(dim=-1)


# --------------------------------------------------------------------------- prompt logprobs
@dataclass
class PromptLogprobs:
    logprobs: torch.Tensor  # [T] fp32, logprob of each target token
    ranks: torch.Tensor  # [T] int64 (1 = most likely)
    top_ids: torch.Tensor | None  # [T, K] int64
    top_logprobs: torch.Tensor | None  # [T, K] fp32


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, num_top: int,
                            rows_per_chunk: int = 256) -> PromptLogprobs:
    """Raw logprobs of a prompt's tokens: logits [T, V] of prompt positions p..p+T-1 and target_ids [T] the
    tokens at positions p+1..p+T (the token each position predicts). The first prompt token has no
    logprob (None in the API); the engine concatenates chunks of a chunked prefill. fp32, computed
    `rows_per_chunk` rows at a time so a long prompt never holds [T, V] fp32 at once."""
    T = logits.shape[0]
    target_ids = target_ids.to(device=logits.device, dtype=torch.int64)
    lps, ranks, tids, tlps = [], [], [], []
    for s in range(0, T, rows_per_chunk):
        lp = torch.log_softmax(logits[s:s + rows_per_chunk].float(), dim=-1)
        tgt = lp.gather(1, target_ids[s:s + rows_per_chunk, None])
        lps.append(tgt[:, 0])
        ranks.append((lp > tgt).sum(dim=-1) + 1)
        if num_top > 0:
            top = lp.topk(num_top, dim=-1)
            tids.append(top.indices)
            tlps.append(top.values)
    empty = logits.new_zeros(0, dtype=torch.float32)
    return PromptLogprobs(torch.cat(lps) if lps else empty,
                          torch.cat(ranks) if ranks else empty.long(),
                          torch.cat(tids) if tids else None, torch.cat(tlps) if tlps else None)
