"""Batched sampling on the device: one row of logits per sequence that produces a token this step.

`SamplingBatch.build(...)` turns the requests' SamplingParams into tensors once per step; `Sampler`
then applies temperature, top-k, top-p and draws, vectorised over the batch. Greedy rows take the
argmax. Random rows draw with the exponential-race trick (argmax of p / E, E ~ Exp(1)); a request
with a seed draws its noise from its own torch.Generator, so its output does not depend on which
other requests share the batch.

Logprobs are those of the model's raw distribution (log_softmax of the unprocessed logits, fp32),
as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_linear.sampling_params import SamplingParams


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

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab_size: int,
              device: torch.device | str) -> "SamplingBatch":
        greedy = [p.greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p for p in params]
        lps = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            generators=list(generators),
            num_logprobs=max(lps) if lps else -1,
            all_greedy=all(greedy),
            use_top_k=any(k < vocab_size for k in top_k),
            use_top_p=any(p < 1.0 for p in top_p),
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32, raw logprob of the sampled token
    top_ids: torch.Tensor | None = None  # [B, K] int64
    top_logprobs: torch.Tensor | None = None  # [B, K] fp32


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k and top-p nucleus. logits [B, V] fp32."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(V, device=logits.device)[None, :]
        mask |= ranks >= top_k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        mask |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator | None],
                      device: torch.device) -> torch.Tensor:
    q = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return q


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            x = logits / batch.temperature[:, None]
            x = apply_top_k_top_p(x, batch.top_k if batch.use_top_k else None,
                                  batch.top_p if batch.use_top_p else None)
            probs = x.softmax(dim=-1)
            q = exponential_noise(tuple(probs.shape), batch.generators, probs.device)
            sampled = (probs / q).argmax(dim=-1)
            tokens = torch.where(batch.greedy, logits.argmax(dim=-1), sampled)
        out = SamplerOutput(token_ids=tokens, logprobs=raw_logprobs.gather(1, tokens[:, None])[:, 0])
        if batch.num_logprobs > 0:
            top = raw_logprobs.topk(batch.num_logprobs, dim=-1)
            out.top_ids, out.top_logprobs = top.indices, top.values
        return out
