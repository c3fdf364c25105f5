"""Batch-1 decode time per output token (TPOT) at long contexts: the hybrid model vs the same shape all-MLA.

    python -m benchmarks.engine_decode                      # 48b-a3b-e64, contexts 4K,128K,1M, bf16, CUDA
    python -m benchmarks.engine_decode --preset tiny --contexts 64,256 --steps 4 --device cpu   # smoke test

For each variant (hybrid: the preset as is; mla: every layer MLA, kda_layers = []) the engine is built
from config.json alone with random weights (`load_format="dummy"`). Each context is reached through
the engine's own cache structures: `LLMEngine.admit_computed` takes the request's MLA blocks from the
block pool and its KDA slot from the state pool and marks ctx - 1 tokens computed; the benchmark then
fills those latent blocks and KDA states with random values (never zeros), and decodes `--steps`
tokens with `engine.step()` (CUDA-graph replay on CUDA), timing the wall clock between successive
returns of `step()` (median; with async scheduling a step returns while the next one runs, so that
period is the TPOT). `--async-scheduling on|off|both` (default both: off, then on, on the same engine
and request) prints TPOT, graph replay and TPOT minus replay (the host work left unoverlapped) per mode.

Correctness first: the first decode step is run through the graph and through the same padded code
eagerly, from the same caches, and the logits must agree. The floor (performance.md section 4) is
the bytes one step must move divided by the copy bandwidth measured in the same run: the active
weights (every attention layer, k routed + shared experts + router per MoE layer, the dense layer,
lm_head, one embedding row), the KDA states read and written, and the latent cache of the context
(`benchmarks/decode_floor.py` counts them, per category: `profile_decode.py` prints each beside its time).
Prints each TPOT beside its floor and the hybrid / all-MLA ratio; writes JSON to $OUT if set.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import tempfile
import time

import torch

from benchmarks.common import add_shape_args, copy_bandwidth, shape_config, wall_ms, write_report
from benchmarks.decode_floor import step_bytes
from kimi_linear import LLM, SamplingParams


def parse_count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(text[-1:], 1)
    return int(text[:-1] if mult > 1 else text) * mult


def variant_config(base: dict, variant: str) -> dict:
    d = copy.deepcopy(base)
    d.pop("layer_types", None)
    if variant == "mla":
        L = d["num_hidden_layers"]
        d["linear_attn_config"] = {**d["linear_attn_config"], "kda_layers": [],
                                   "full_attn_layers": list(range(1, L + 1))}
    return d


# ---------------------------------------------------------------- timing helpers
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        """Milliseconds that fn() takes (CUDA events on the GPU, perf_counter on the CPU)."""
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        return wall_ms(fn)


# ---------------------------------------------------------------- one context
@torch.no_grad()
def fill_random(engine, req, context: int) -> None:
    """Random latent blocks and KDA states for the request (never zeros), as if prefilled."""
    cache = engine.runner.cache
    blocks = torch.tensor(req.block_ids, dtype=torch.long, device=cache.device)
    g = torch.Generator(device=cache.device).manual_seed(context)
    for t in cache.paged_tensors():
        for i in range(0, len(blocks), 2048):  # chunks: a 1M-token context is GBs per layer
            part = blocks[i:i + 2048]
            t[part] = torch.randn((len(part), *t.shape[1:]), generator=g, device=t.device).to(t.dtype)
    states = [(st.name, t) for s, ts in zip(cache.specs, cache.tensors) if s is not None and not s.paged
              for st, t in zip(s.states, ts)]
    # all KDA recurrent states first, then the conv windows (the fill order of the seeded generator)
    for t, std in [(t, 0.05) for n, t in states if n == "recurrent"] + [(t, 1.0) for n, t in states if n == "conv"]:
        t[req.state_slot] = (torch.randn(t.shape[1:], generator=g, device=t.device) * std).to(t.dtype)


@torch.no_grad()
def check_graph_vs_eager(engine) -> float | None:
    """The first decode step through the graph and eagerly from the same caches: relative logits error."""
    runner, sched = engine.runner, engine.scheduler
    out = sched.schedule()
    assert out.is_decode and len(out.scheduled) == 1, out
    slot = out.scheduled[0][0].state_slot
    states = [(t, t[slot].clone()) for t in runner.cache.slot_tensors()]
    a, _ = runner.forward(out, use_graph=True)
    a = a.float().clone()
    for t, s in states:
        t[slot] = s
    b, _ = runner.forward(out, use_graph=False)
    for t, s in states:  # leave the caches as they were: the engine runs this step for real next
        t[slot] = s
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise RuntimeError("non-finite logits on the decode path")
    if not runner.decode.graphs:
        return None
    return ((a - b.float()).norm() / b.float().norm()).item()


def time_steps(engine, steps: int, warmup: int) -> list[float]:
    """Milliseconds between successive returns of `engine.step()` (wall clock, no device sync of our own: with
    async scheduling a step returns while the next one runs, so its period is the TPOT)."""
    for _ in range(warmup):
        engine.step()
    t = [time.perf_counter()]
    for _ in range(steps):
        engine.step()
        t.append(time.perf_counter())
    return [(b - a) * 1e3 for a, b in zip(t, t[1:])]


def run_context(engine, context: int, steps: int, warmup: int, timer: Timer, modes: tuple[str, ...] = ("sync",)
                ) -> dict:
    """Decode `warmup + steps` tokens per mode ("sync": async scheduling off, "async": on) from one request at
    `context`; TPOT per mode, the graph replay alone, and TPOT minus replay (the host work not overlapped)."""
    vocab = engine.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    rid = f"ctx{context}"
    params = SamplingParams(temperature=0, max_tokens=(steps + warmup) * len(modes) + 1, ignore_eos=True)
    req = engine.admit_computed(rid, {"prompt_token_ids": prompt}, params, num_computed_tokens=context - 1)
    fill_random(engine, req, context)
    err = check_graph_vs_eager(engine)
    async_before = engine.async_scheduling
    by_mode = {}
    for mode in modes:
        engine.async_scheduling = mode == "async"
        step_ms = time_steps(engine, steps, warmup)
        by_mode[mode] = {"tpot_ms": statistics.median(step_ms), "tpot_min_ms": min(step_ms)}
    engine.async_scheduling = async_before
    dec = engine.runner.decode
    replay_ms = None
    if dec.graphs:
        g = dec.graphs[dec.bucket_for(1)]
        replay_ms = statistics.median(timer(g.replay) for _ in range(steps))
    for m in by_mode.values():
        m["host_ms"] = m["tpot_ms"] - replay_ms if replay_ms is not None else None
    engine.abort_request(rid)
    engine.step()
    s = engine.scheduler
    assert s.block_pool.num_free == s.block_pool.num_blocks and s.state_pool.num_free == s.state_pool.num_slots
    main = by_mode.get("async", by_mode[modes[0]])
    return {"context": context, "tpot_ms": main["tpot_ms"], "tpot_min_ms": main["tpot_min_ms"], "modes": by_mode,
            "replay_ms": replay_ms, "graph_vs_eager_rel_err": err, "generated": req.num_output_tokens}


def run_variant(base: dict, variant: str, args, timer: Timer, bandwidth: float, tmp: str, label: str | None = None,
                engine_kwargs: dict | None = None, contexts: list[int] | None = None, on_engine=None) -> list[dict]:
    """Build the engine of `variant` (dummy weights), time each context, free it. `label` names the rows
    (default: the variant), `engine_kwargs` add engine options (quantization, kv_cache_dtype, ...),
    `on_engine(engine)` runs before the timings (its dict lands in the first row's "extra")."""
    label = label or variant
    folder = os.path.join(tmp, label)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(variant_config(base, variant), f)
    contexts = contexts or args.contexts
    modes = getattr(args, "modes", ("async",))  # callers without --async-scheduling: the engine's default
    t0 = time.perf_counter()
    llm = LLM(folder, device=args.device, dtype=args.dtype, load_format="dummy",
              max_model_len=max(contexts) + (args.steps + args.warmup) * len(modes) + 8, max_num_seqs=1,
              max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, block_size=args.block_size,
              **{"async_scheduling": "async" in modes, **(engine_kwargs or {})})
    engine = llm.llm_engine
    print(f"[{label}] engine ready in {time.perf_counter() - t0:.1f} s: {engine.runner.sizing.token_capacity} "
          f"cache tokens, graphs {sorted(engine.runner.decode.graphs)}", flush=True)
    extra = on_engine(engine) if on_engine else None
    rows = []
    for ctx in contexts:
        r = run_context(engine, ctx, args.steps, args.warmup, timer, modes)
        nbytes = step_bytes(engine.runner.model, ctx, engine.runner.kv_cache_dtype)
        floor_ms = nbytes["total"] / bandwidth * 1e3
        r.update(variant=label, bytes=nbytes, floor_ms=floor_ms, tpot_over_floor=r["tpot_ms"] / floor_ms,
                 replay_over_floor=(r["replay_ms"] / floor_ms) if r["replay_ms"] else None)
        if extra is not None and not rows:
            r["extra"] = extra
        per_mode = ", ".join(f"{m} {v['tpot_ms']:.3f}" for m, v in r["modes"].items())
        print(f"[{label}] ctx {ctx:>8}: TPOT {per_mode} ms (floor {floor_ms:.3f} ms, "
              f"{r['tpot_over_floor']:.2f}x), graph vs eager err {r['graph_vs_eager_rel_err']}", flush=True)
        rows.append(r)
    llm.shutdown()
    del llm, engine
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
        print(f"[{label}] freed: {torch.cuda.memory_allocated() / 2 ** 30:.2f} GiB still allocated", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap, "48b-a3b-e64", "model shape preset (default 48b-a3b-e64)")
    ap.add_argument("--contexts", default="4K,128K,1M", help="comma-separated contexts, K/M suffixes allowed")
    ap.add_argument("--variants", default="hybrid,mla", help="hybrid and/or mla (every layer MLA)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per context")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="profiling / prefill budget")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", choices=("on", "off", "both"), default="both",
                    help="time decode with async scheduling on, off, or both on the same engine (default both)")
    ap.add_argument("--copy-bytes", type=int, default=None, help="buffer size of the bandwidth measurement")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.contexts = [parse_count(c) for c in args.contexts.split(",") if c.strip()]
    args.modes = {"on": ("async",), "off": ("sync",), "both": ("sync", "async")}[args.async_scheduling]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    base = shape_config(args)
    timer = Timer(device)
    nbytes = args.copy_bytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    bandwidth = copy_bandwidth(nbytes, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {gpu}; copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if variant not in ("hybrid", "mla"):
                raise SystemExit(f"unknown variant {variant!r}")
            results += run_variant(base, variant, args, timer, bandwidth, tmp)

    ratios = []
    by = {(r["variant"], r["context"]): r for r in results}
    for ctx in args.contexts:
        h, m = by.get(("hybrid", ctx)), by.get(("mla", ctx))
        if h and m:
            ratios.append({"context": ctx, "mla_over_hybrid_tpot": m["tpot_ms"] / h["tpot_ms"],
                           "mla_over_hybrid_floor": m["floor_ms"] / h["floor_ms"]})
    print("\nvariant  context   TPOT ms  graph ms  floor ms  TPOT/floor  step GB  graph-vs-eager")
    for r in results:
        g = f"{r['replay_ms']:.3f}" if r["replay_ms"] else "-"
        e = f"{r['graph_vs_eager_rel_err']:.1e}" if r["graph_vs_eager_rel_err"] is not None else "-"
        print(f"{r['variant']:<8} {r['context']:>8} {r['tpot_ms']:>9.3f} {g:>9} {r['floor_ms']:>9.3f} "
              f"{r['tpot_over_floor']:>10.2f}x {r['bytes']['total'] / 1e9:>8.2f}  {e}")
    print("\nvariant  context  scheduling   TPOT ms  graph ms  TPOT - graph ms")
    for r in results:
        for mode, m in r["modes"].items():
            g = f"{r['replay_ms']:.3f}" if r["replay_ms"] else "-"
            h = f"{m['host_ms']:.3f}" if m["host_ms"] is not None else "-"
            print(f"{r['variant']:<8} {r['context']:>8}  {mode:<10} {m['tpot_ms']:>8.3f} {g:>9} {h:>16}")
    for q in ratios:
        print(f"context {q['context']:>8}: all-MLA / hybrid TPOT {q['mla_over_hybrid_tpot']:.2f}x "
              f"(floor ratio {q['mla_over_hybrid_floor']:.2f}x)")
    report = {"device": gpu, "copy_bandwidth_Bps": bandwidth, "dtype": args.dtype,
              "preset": None if args.model else args.preset, "model": args.model, "steps": args.steps,
              "results": results, "ratios": ratios}
    write_report(report, "engine_decode.json", args.json)
    return report


if __name__ == "__main__":
    main()
