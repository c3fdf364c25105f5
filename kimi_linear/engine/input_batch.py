"""BatchInputs: a scheduled step flattened into host lists (pure Python; the runner makes tensors).

Sequence n of the step computes `query_lens[n]` new tokens after `context_lens[n]` cached ones; its
tokens sit back to back in `input_ids`. `slot_mapping` gives each new token's flat paged-cache slot
(block_ids[p // block_size] * block_size + p % block_size). A sequence whose step reaches its last
token is sampled: `sample_index` holds the flat index of that token and `sample_requests` the request.
A sequence asking for prompt logprobs lists, in `prompt_logprobs`, the prompt positions of this chunk
whose logits it still needs (position p predicts prompt token p + 1, so positions 0 .. P - 2; those
computed before a preemption are skipped): (request, flat index of the first, first position, count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kimi_linear.engine.request import Request
from kimi_linear.engine.scheduler import SchedulerOutput


@dataclass
class BatchInputs:
    requests: list[Request] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    state_indices: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)  # flat token index of each sampled row
    sample_requests: list[Request] = field(default_factory=list)
    sample_seq: list[int] = field(default_factory=list)  # sequence index of each sampled row
    prompt_logprobs: list[tuple[Request, int, int, int]] = field(default_factory=list)
    prompt_logprob_rows: list = field(default_factory=list)  # the runner's results: (request, rows)

    @property
    def num_seqs(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: the decode kernels and the CUDA-graph path apply."""
        return self.num_seqs > 0 and all(q == 1 for q in self.query_lens)

    @property
    def cu_seqlens(self) -> list[int]:
        cu = [0]
        for q in self.query_lens:
            cu.append(cu[-1] + q)
        return cu


def build_batch(out: SchedulerOutput, block_size: int) -> BatchInputs:
    b = BatchInputs()
    for req, n in out.scheduled:
        start = req.num_computed_tokens
        end = start + n
        if len(req.block_ids) * block_size < end:
            raise RuntimeError(f"{req.request_id}: {len(req.block_ids)} blocks cannot hold {end} tokens")
        if req.state_slot is None:
            raise RuntimeError(f"{req.request_id}: scheduled without a state slot")
        b.requests.append(req)
        if req.wants_prompt_logprobs:
            lo, hi = max(start, req.num_prompt_logprobs), min(end, req.num_prompt_tokens - 1)
            if hi > lo:
                b.prompt_logprobs.append((req, len(b.input_ids) + lo - start, lo, hi - lo))
        b.input_ids.extend(req.token_slice(start, end))
        b.query_lens.append(n)
        b.context_lens.append(start)
        b.seq_lens.append(end)
        b.state_indices.append(req.state_slot)
        ids = req.block_ids
        b.slot_mapping.extend(ids[p // block_size] * block_size + p % block_size for p in range(start, end))
        if end == req.num_tokens:
            b.sample_index.append(len(b.input_ids) - 1)
            b.sample_requests.append(req)
            b.sample_seq.append(len(b.requests) - 1)
    return b
