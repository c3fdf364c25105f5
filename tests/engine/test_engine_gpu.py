"""The engine on CUDA: greedy equality with the reference model with CUDA graphs on and off (chunked
prefill, mixed batches and preemption forced), graph replay equal to the eager padded path in bf16,
and memory sizing from gpu_memory_utilization. Pools are empty afterwards."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from helpers import rel_err
from test_llm_reference import assert_pools_empty, make_prompts, run_equality_check

from kimi_linear import LLM, SamplingParams

pytestmark = pytest.mark.gpu

SMALL = dict(device="cuda", max_model_len=64, max_num_seqs=5, max_num_batched_tokens=20, block_size=8,
             num_gpu_blocks_override=12, num_state_slots_override=5)


def free(llm: LLM) -> None:
    llm.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_greedy_matches_reference_on_cuda(tiny_checkpoint, enforce_eager):
    llm = LLM(str(tiny_checkpoint), dtype="float32", enforce_eager=enforce_eager, **SMALL)
    stats = run_equality_check(llm)
    assert stats.num_preemptions > 0 and stats.num_chunked_prefills > 0 and stats.num_mixed_steps > 0, stats
    dec = llm.llm_engine.runner.decode
    if enforce_eager:
        assert not dec.graphs and dec.num_replays == 0 and dec.num_eager > 0
    else:
        assert sorted(dec.graphs) == [1, 2, 4, 5] and dec.num_replays > 0 and dec.num_eager == 0
    assert_pools_empty(llm)
    free(llm)


def _snapshot(cache, slots):
    return [(t, t[slots].clone()) for t in cache.slot_tensors()]


def _restore(snap, slots):
    for t, saved in snap:
        t[slots] = saved


@torch.no_grad()
@pytest.mark.parametrize("num_seqs", [5, 3, 1])
def test_graph_replay_equals_eager_padded_path_bf16(tiny_checkpoint, num_seqs):
    """One decode step through the captured graph and through the same code run eagerly give the same
    logits from the same caches (3 sequences exercise a padded bucket of 4)."""
    # synchronous steps: the test schedules and runs a step itself, which needs no step in flight
    llm = LLM(str(tiny_checkpoint), dtype="bfloat16", async_scheduling=False,
              **{**SMALL, "num_gpu_blocks_override": 40})
    eng = llm.llm_engine
    prompts = make_prompts(eng.vocab_size)[-num_seqs:]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    sched, runner = eng.scheduler, eng.runner
    while len([r for r in sched.running if r.num_output_tokens > 0]) < num_seqs:
        eng.step()
    for _ in range(3):  # a few graph steps first
        eng.step()
    out = sched.schedule()
    assert out.is_decode and len(out.scheduled) == num_seqs
    slots = [r.state_slot for r, _ in out.scheduled]
    snap = _snapshot(runner.cache, slots)
    replays = runner.decode.num_replays
    graph_logits, _ = runner.forward(out, use_graph=True)
    graph_logits = graph_logits.float().clone()
    assert runner.decode.num_replays == replays + 1
    _restore(snap, slots)
    eager_logits, _ = runner.forward(out, use_graph=False)
    e = rel_err(eager_logits.float(), graph_logits)
    assert e < 1e-3, f"graph vs eager logits differ: relative error {e:.2e}"
    assert torch.equal(graph_logits.argmax(-1), eager_logits.float().argmax(-1))
    eng.abort_request([str(i) for i in range(num_seqs)])
    eng.step()
    assert_pools_empty(llm)
    free(llm)


def test_memory_sizing_from_utilization(tiny_checkpoint, caplog):
    gc.collect()
    torch.cuda.empty_cache()
    free_bytes, total = torch.cuda.mem_get_info()
    util = min(0.2, 0.8 * free_bytes / total)
    with caplog.at_level(logging.INFO, logger="kimi_linear.engine"):
        llm = LLM(str(tiny_checkpoint), device="cuda", dtype="bfloat16", gpu_memory_utilization=util,
                  max_model_len=4096, max_num_seqs=32, max_num_batched_tokens=2048)
    text = caplog.text
    assert "peak activations" in text and "max concurrent sequences of 4096 tokens" in text
    sizing = llm.llm_engine.runner.sizing
    assert sizing.num_slots == 32 and sizing.token_capacity >= 4096
    cache_bytes = sizing.num_blocks * sizing.bytes_per_block + sizing.num_slots * sizing.bytes_per_slot
    assert cache_bytes <= util * total
    assert cache_bytes > 0.3 * util * total  # most of the budget went to the caches (tiny weights)
    outs = llm.generate([{"prompt_token_ids": p} for p in make_prompts(llm.llm_engine.vocab_size)],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert_pools_empty(llm)
    free(llm)
