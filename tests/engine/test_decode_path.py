"""The runner's decode path on the CPU: static bucket-padded buffers (the code CUDA graphs replay), the
persistent block table, batch flattening, and cache sizing arithmetic."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_llm_reference import assert_pools_empty

from kimi_linear import LLM, SamplingParams
from kimi_linear.engine.block_table import BlockTable
from kimi_linear.engine.cuda_graph import decode_buckets
from kimi_linear.engine.input_batch import build_batch
from kimi_linear.engine.memory import plan_cache
from kimi_linear.engine.request import Request
from kimi_linear.engine.scheduler import SchedulerOutput
from kimi_linear.errors import ConfigError

POISON = 1.0e4


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    # synchronous steps: the test drives the scheduler and the runner itself between steps, which needs no step
    # in flight (async scheduling keeps one)
    return LLM(str(tiny_checkpoint), device="cpu", dtype="float32", max_model_len=64, max_num_seqs=4,
               max_num_batched_tokens=64, block_size=4, num_gpu_blocks_override=40, async_scheduling=False)


def cache_tensors(cache):
    return cache.paged_tensors() + cache.slot_tensors()


@torch.no_grad()
def test_padded_decode_batch_equals_each_sequence_alone_and_touches_nothing_else(llm):
    eng = llm.llm_engine
    runner, sched = eng.runner, eng.scheduler
    for i, n in enumerate((3, 9, 14)):
        eng.add_request(f"r{i}", {"prompt_token_ids": list(range(10 + i, 10 + i + n))},
                        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    while len([r for r in sched.running if r.num_output_tokens > 0]) < 3:
        eng.step()
    reqs = list(sched.running)
    out = sched.schedule()  # may hand out a new block (a decode crossing a block boundary): own it before poisoning
    # poison every state slot and block the three requests do not own
    cache = runner.cache
    owned_slots = {r.state_slot for r in reqs}
    owned_blocks = {b for r in reqs for b in r.block_ids}
    free_slots = [s for s in range(cache.num_slots) if s not in owned_slots]
    free_blocks = [b for b in range(cache.num_blocks) if b not in owned_blocks]
    assert cache.num_slots - 1 in free_slots  # slot -1 would alias the last slot: it must stay untouched
    for t in cache.slot_tensors():
        t[free_slots] = POISON
    for t in cache.paged_tensors():
        t[free_blocks] = POISON
    before = [t.clone() for t in cache_tensors(cache)]

    assert out.is_decode and len(out.scheduled) == 3 and runner.decode.bucket_for(3) == 4
    eager0 = runner.decode.num_eager
    batched, _ = runner.forward(out)
    assert runner.decode.num_eager == eager0 + 1 and batched.shape[0] == 3
    assert torch.isfinite(batched).all()
    for t in cache.slot_tensors():
        assert torch.equal(t[free_slots], torch.full_like(t[free_slots], POISON)), "padding touched a free slot"
    for t in cache.paged_tensors():
        assert torch.equal(t[free_blocks], torch.full_like(t[free_blocks], POISON)), "latent written off-slot"

    for n, (req, _) in enumerate(out.scheduled):  # each sequence alone, from the same starting caches
        for t0, t1 in zip(before, cache_tensors(cache)):
            t1.copy_(t0)
        alone, _ = runner.forward(SchedulerOutput(scheduled=[(req, 1)]))
        assert_close(f"sequence {n} alone vs padded batch", alone[0], batched[n], 1e-5)
    eng.abort_request(["r0", "r1", "r2"])
    eng.step()
    assert_pools_empty(llm)


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(4) == [1, 2, 4]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert decode_buckets(256)[-3:] == [224, 240, 256] and len(decode_buckets(256)) == 4 + 16


def test_block_table_incremental_sync_and_new_owner():
    bt = BlockTable(num_slots=3, max_blocks_per_seq=6, device=torch.device("cpu"))
    r = Request("a", [1, 2, 3], SamplingParams())
    r.state_slot, r.slot_epoch, r.block_ids = 2, 1, [5, 9]
    bt.sync([r])
    assert bt.table[2, :2].tolist() == [5, 9]
    r.block_ids.append(4)
    bt.table[2, 0] = 77  # an incremental sync writes only the new id
    bt.sync([r])
    assert bt.table[2, :3].tolist() == [77, 9, 4]
    r.slot_epoch, r.block_ids = 2, [8]  # same request re-admitted (preemption): the row is rewritten
    bt.sync([r])
    assert bt.table[2, :1].tolist() == [8]
    rows = bt.rows(torch.tensor([2, -1], dtype=torch.int32), num_blocks=2)
    assert rows.tolist() == [[8, 9], bt.table[0, :2].tolist()]
    r.block_ids = list(range(7))
    with pytest.raises(RuntimeError, match="exceed the block table width"):
        bt.sync([r])


def test_build_batch_flattens_a_mixed_step():
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams())
    a.num_computed_tokens, a.block_ids, a.state_slot = 3, [7, 2], 1
    b = Request("b", [9, 9], SamplingParams())
    b.output_token_ids = [6]
    b.num_computed_tokens, b.block_ids, b.state_slot = 2, [4], 0
    batch = build_batch(SchedulerOutput(scheduled=[(b, 1), (a, 1)]), block_size=4)
    assert batch.input_ids == [6, 4] and batch.is_decode
    assert batch.slot_mapping == [4 * 4 + 2, 7 * 4 + 3] and batch.seq_lens == [3, 4]
    assert batch.sample_requests == [b] and batch.sample_seq == [0]  # a's chunk does not reach its end
    batch = build_batch(SchedulerOutput(scheduled=[(a, 2)]), block_size=4)
    assert batch.input_ids == [4, 5] and batch.slot_mapping == [31, 8] and batch.sample_index == [1]
    assert not batch.is_decode and batch.cu_seqlens == [0, 2] and batch.context_lens == [3]
    with pytest.raises(RuntimeError, match="cannot hold"):
        build_batch(SchedulerOutput(scheduled=[(a, 2)]), block_size=2)


def test_plan_cache():
    MiB = 1 << 20
    # slots first (up to max_num_seqs), blocks take the rest
    assert plan_cache(100 * MiB, MiB, 4 * MiB, 16, max_num_seqs=8, min_tokens=160) == (68, 8)
    # short of memory: fewer slots, blocks for one min_tokens sequence kept
    assert plan_cache(30 * MiB, MiB, 4 * MiB, 16, max_num_seqs=8, min_tokens=160) == (10, 5)
    # no KDA layers (all-MLA): slots are free
    assert plan_cache(10 * MiB, MiB, 0, 16, max_num_seqs=8, min_tokens=16) == (10, 8)
    # fixed counts are honoured
    assert plan_cache(100 * MiB, MiB, 4 * MiB, 16, 8, 16, num_slots=2) == (92, 2)
    assert plan_cache(100 * MiB, MiB, 4 * MiB, 16, 8, 16, num_blocks=20) == (20, 8)
    with pytest.raises(ConfigError, match="cannot hold one sequence of 1000 tokens") as e:
        plan_cache(10 * MiB, MiB, 4 * MiB, 16, 8, min_tokens=1000)
    assert e.value.key == "gpu_memory_utilization"


def test_cuda_sizing_arithmetic_with_faked_device(tiny_checkpoint, monkeypatch):
    """cuda_sizing's budget: total * utilization - our footprint - peak activations, split by plan_cache."""
    from kimi_linear.config import ModelConfig
    from kimi_linear.engine import memory
    from kimi_linear.engine.config import EngineConfig
    from kimi_linear.models import KimiLinearForCausalLM, ModelCache

    GiB = 1 << 30
    total, free_at_start, weights, peak = 80 * GiB, 79 * GiB, 2 * GiB, 3 * GiB
    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device=None: (free_at_start - weights, total))
    monkeypatch.setattr(memory, "profile_peak_activation", lambda *a, **k: peak)
    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    cfg = EngineConfig(model=str(tiny_checkpoint), gpu_memory_utilization=0.5, max_num_seqs=8, block_size=16,
                       enable_prefix_caching=False)  # the snapshot pool's share: tests/engine/test_prefix_cache_units.py
    specs = KimiLinearForCausalLM.cache_specs(mc, torch.bfloat16)
    s = memory.cuda_sizing(None, specs, "cuda", cfg, 1024, free_at_start, 64, 1024)
    bpb = ModelCache.bytes_per_block(specs, 16)
    bps = ModelCache.bytes_per_slot(specs) + 64
    available = 40 * GiB - weights - peak  # 0.5 * 80 GiB minus what the engine holds and its peak
    assert s.num_slots == 8 and s.bytes_per_slot == bps
    assert s.num_blocks == (available - 8 * bps) // bpb
    with pytest.raises(ConfigError, match="only 79.0 GiB are free") as e:
        memory.cuda_sizing(None, specs, "cuda", cfg.replace(gpu_memory_utilization=0.99), 1024,
                           free_at_start, 64, 1024)
    assert e.value.key == "gpu_memory_utilization"
    fixed = memory.cuda_sizing(None, specs, "cuda",
                               cfg.replace(num_gpu_blocks_override=7, num_state_slots_override=3), 1024, 0, 64, 16)
    assert (fixed.num_blocks, fixed.num_slots) == (7, 3)  # both overrides: no profiling at all
