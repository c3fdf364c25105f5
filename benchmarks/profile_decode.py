"""Where the time of a batch-1 decode step goes: per-kernel GPU time from the torch profiler, per category
beside that category's floor.

    python -m benchmarks.profile_decode [--preset 48b-a3b-e64] [--context 4096] [--steps 5] [--quantization fp8]

Builds the engine with random weights (like engine_decode.py), reaches the context through the engine's
cache structures, checks the graph step against the eager one (same caches, logits must agree), then
profiles `--steps` decode steps (forward + sampling) twice: eagerly (every kernel visible by name) and
through the CUDA graph (the whole step as the GPU runs it). Prints the kernels grouped by name with their
time per step, largest first, then per category (`benchmarks/decode_floor.py`: kernel name -> category, and
the bytes each category must move): time per step, share, floor (bytes / the copy bandwidth measured in the
same run), time / floor; the total against the whole step's floor (the same floor as engine_decode.py's),
the graph replay, and the wall TPOT of `engine.step()`. Kernels no rule knows are counted as "other" and
listed. Writes the same as JSON to $OUT/profile_decode.json (when $OUT is set) and to `--json`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile

import torch

from benchmarks.common import copy_bandwidth, write_report
from benchmarks.decode_floor import CATEGORIES, OTHER, kernel_category, step_bytes_by_category
from benchmarks.engine_decode import Timer, check_graph_vs_eager, fill_random, time_steps, variant_config
from kimi_linear import LLM, SamplingParams
from kimi_linear.tools.presets import preset_config


# ---------------------------------------------------------------- profiling
def decode_step(engine, use_graph: bool) -> None:
    """One decode step by hand (forward + sampling + the scheduler's update), graph or eager."""
    runner = engine.runner
    out = engine.scheduler.schedule()
    logits, batch = runner.forward(out, use_graph=use_graph)
    sampled = runner.sample(logits, batch.sample_requests)
    engine.scheduler.update_from_output(out, {rid: s.token_id for rid, s in sampled.items()})


def profile_steps(engine, steps: int, use_graph: bool) -> tuple[list[dict], float]:
    """Kernels of `steps` decode steps grouped by name: [{name, us (per step), calls (per step), category}],
    largest first, and the GPU kernel time per step in us."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        decode_step(engine, use_graph)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            decode_step(engine, use_graph)
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            dt = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            per[e.name][0] += dt
            per[e.name][1] += 1
    rows = [{"name": k, "us": v[0] / steps, "calls": v[1] // steps, "category": kernel_category(k)}
            for k, v in per.items()]
    rows.sort(key=lambda r: -r["us"])
    return rows, sum(r["us"] for r in rows)


def category_table(rows: list[dict], floor_bytes: dict[str, int], bandwidth: float) -> list[dict]:
    """Per category, in CATEGORIES order: us/step, launches/step, share of the kernel time, floor us
    (None where the category moves no bytes of its own) and time / floor."""
    total = sum(r["us"] for r in rows) or 1.0
    out = []
    for cat in CATEGORIES:
        us = sum(r["us"] for r in rows if r["category"] == cat)
        calls = sum(r["calls"] for r in rows if r["category"] == cat)
        floor_us = floor_bytes[cat] / bandwidth * 1e6 if floor_bytes[cat] else None
        out.append({"category": cat, "us": us, "launches": calls, "share": us / total, "floor_bytes": floor_bytes[cat],
                    "floor_us": floor_us, "time_over_floor": us / floor_us if floor_us else None})
    return out


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def print_categories(table: list[dict], total_us: float, floor_us: float, replay_ms: float | None,
                     tpot_ms: float | None) -> None:
    print(f"{'category':<28} {'us/step':>9} {'calls':>6} {'share':>6} {'floor us':>9} {'time/floor':>10} "
          f"{'floor MB':>9}")
    for r in table:
        if not r["us"] and not r["floor_bytes"]:
            continue
        f = f"{r['floor_us']:.1f}" if r["floor_us"] is not None else "-"
        print(f"{r['category']:<28} {r['us']:9.1f} {r['launches']:6d} {r['share']:6.1%} {f:>9} "
              f"{_ratio(r['time_over_floor']):>10} {r['floor_bytes'] / 1e6:9.2f}")
    launches = sum(r["launches"] for r in table)
    total_mb = sum(r["floor_bytes"] for r in table) / 1e6
    print(f"{'total (GPU kernels)':<28} {total_us:9.1f} {launches:6d} {1:6.1%} {floor_us:9.1f} "
          f"{_ratio(total_us / floor_us):>10} {total_mb:9.2f}")
    if replay_ms is not None:
        print(f"{'graph replay':<28} {replay_ms * 1e3:9.1f} {'':>6} {'':>6} {floor_us:9.1f} "
              f"{_ratio(replay_ms * 1e3 / floor_us):>10}")
    if tpot_ms is not None:
        print(f"{'wall TPOT (engine.step)':<28} {tpot_ms * 1e3:9.1f} {'':>6} {'':>6} {floor_us:9.1f} "
              f"{_ratio(tpot_ms * 1e3 / floor_us):>10}")


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="48b-a3b-e64")
    ap.add_argument("--variant", default="hybrid", choices=["hybrid", "mla"])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="profiled decode steps per mode")
    ap.add_argument("--tpot-steps", type=int, default=32, help="timed engine.step() calls for the wall TPOT")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 weights (as benchmarks/fp8.py)")
    ap.add_argument("--async-scheduling", action="store_true", help="time the wall TPOT with async scheduling on")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--copy-bytes", type=int, default=1 << 30, help="buffer size of the bandwidth measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA GPU")
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(args.copy_bytes, device)
    gpu = torch.cuda.get_device_name(device)
    print(f"device {gpu}; copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(variant_config(preset_config(args.preset), args.variant), f)
    warmup = 4
    max_tokens = 2 * (args.steps + 2) + warmup + args.tpot_steps + 16
    llm = LLM(tmp, dtype="bfloat16", load_format="dummy", max_model_len=args.context + max_tokens + 16, max_num_seqs=1,
              max_num_batched_tokens=2048, quantization=args.quantization, async_scheduling=args.async_scheduling,
              gpu_memory_utilization=args.gpu_memory_utilization)
    engine = llm.llm_engine
    prompt = torch.randint(0, engine.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    req = engine.admit_computed("p", {"prompt_token_ids": prompt}, params, num_computed_tokens=args.context - 1)
    fill_random(engine, req, args.context)
    err = check_graph_vs_eager(engine)
    print(f"graph vs eager logits rel err {err}", flush=True)

    floor_bytes = step_bytes_by_category(engine.runner.model, args.context, engine.runner.kv_cache_dtype)
    floor_us = sum(floor_bytes.values()) / bandwidth * 1e6
    modes = {}
    for mode, use_graph in (("eager", False), ("graph", True)):
        rows, total = profile_steps(engine, args.steps, use_graph)
        modes[mode] = {"total_us": total, "launches": sum(r["calls"] for r in rows), "kernels": rows,
                       "categories": category_table(rows, floor_bytes, bandwidth),
                       "other_kernels": [r["name"] for r in rows if r["category"] == OTHER]}

    # the wall TPOT (engine.step, sampling and host work included) and the graph replay alone
    tpot_ms = statistics.median(time_steps(engine, args.tpot_steps, warmup))
    dec = engine.runner.decode
    replay_ms = None
    if dec.graphs:
        g, timer = dec.graphs[dec.bucket_for(1)], Timer(device)
        replay_ms = statistics.median(timer(g.replay) for _ in range(args.tpot_steps))
    llm.shutdown()

    label = f"{args.preset} {args.variant} {args.quantization or 'bf16'}, context {args.context}"
    for mode, m in modes.items():
        print(f"\n=== {mode}: GPU kernel time per step {m['total_us'] / 1e3:.3f} ms ({label}) ===")
        print(f"{'us/step':>9} {'calls':>6} {'share':>6}  {'category':<28} kernel")
        for r in m["kernels"][:args.top]:
            print(f"{r['us']:9.1f} {r['calls']:6d} {r['us'] / m['total_us']:6.1%}  {r['category']:<28} "
                  f"{r['name'][:90]}")
    for mode, m in modes.items():
        graph = mode == "graph"
        print(f"\n=== {mode}: by category beside the floor ({label}; {m['launches']} launches/step, "
              f"copy {bandwidth / 1e12:.3f} TB/s) ===")
        print_categories(m["categories"], m["total_us"], floor_us, replay_ms if graph else None,
                         tpot_ms if graph else None)
        if m["other_kernels"]:
            print("other (no rule in benchmarks/decode_floor.py): " + "; ".join(n[:90] for n in m["other_kernels"]))
    report = {"device": gpu, "copy_bandwidth_Bps": bandwidth, "preset": args.preset, "variant": args.variant,
              "context": args.context, "quantization": args.quantization, "steps": args.steps,
              "async_scheduling": args.async_scheduling, "graph_vs_eager_rel_err": err, "floor_bytes": floor_bytes,
              "floor_us": floor_us, "tpot_ms": tpot_ms, "tpot_over_floor": tpot_ms * 1e3 / floor_us,
              "replay_ms": replay_ms, "modes": modes}
    write_report(report, "profile_decode.json", args.json)
    return report


if __name__ == "__main__":
    main()
