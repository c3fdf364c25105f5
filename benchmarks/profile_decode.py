"""Where the time of a batch-1 decode step goes: per-kernel GPU time from the torch profiler.

    python -m benchmarks.profile_decode [--preset 48b-a3b-e64] [--context 4096] [--steps 5] [--quantization fp8]

Builds the engine with random weights (like engine_decode.py), reaches the context through the
engine's cache structures, then profiles `--steps` decode steps twice: eagerly (every kernel visible
by name) and through the CUDA graph (the whole step as the GPU runs it). Prints the kernels grouped
by name with their time per step, largest first, and the share of the step they take.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch

from benchmarks.engine_decode import fill_random, variant_config
from kimi_linear import LLM, SamplingParams
from kimi_linear.tools.presets import preset_config


def profile_steps(engine, steps: int, use_graph: bool) -> tuple[list[tuple[str, float, int]], float]:
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    for _ in range(2):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = engine.scheduler.schedule()
            runner.forward(out, use_graph=use_graph)
            engine.scheduler.update_from_output(out, {r.request_id: 0 for r, _ in out.scheduled})
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    total = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            dt = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            per[e.name][0] += dt
            per[e.name][1] += 1
            total += dt
    rows = sorted(((k[:90], v[0] / steps, v[1] // steps) for k, v in per.items()), key=lambda r: -r[1])
    return rows, total / steps


CATEGORIES = [  # (category, substrings of kernel names), first match wins
    ("cuBLAS GEMM/GEMV", ("nvjet", "cublas", "gemv", "gemm", "splitKreduce")),
    ("MoE experts", ("_moe_",)),
    ("MoE router/align", ("_router_", "_align_")),
    ("norms (Triton)", ("_rms_norm", "_gated_rms_norm")),
    ("KDA conv + recurrent", ("_conv_", "_kda_")),
    ("MLA attention", ("_mla_", "_write_latent")),
    ("torch copies/casts", ("copy", "Cat", "cat_")),
    ("torch elementwise/reduce", ("elementwise", "reduce_kernel", "index")),
]


def categorize(rows: list[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
    """(category, us/step, launches/step), largest first."""
    acc = collections.defaultdict(lambda: [0.0, 0])
    for name, us, calls in rows:
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        acc[cat][0] += us
        acc[cat][1] += calls
    return sorted(((c, v[0], v[1]) for c, v in acc.items()), key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="48b-a3b-e64")
    ap.add_argument("--variant", default="hybrid", choices=["hybrid", "mla"])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 weights (as benchmarks/fp8.py)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA GPU")
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(variant_config(preset_config(args.preset), args.variant), f)
    llm = LLM(tmp, dtype="bfloat16", load_format="dummy", max_model_len=args.context + 10 * args.steps + 64, max_num_seqs=1,
              max_num_batched_tokens=2048, quantization=args.quantization,
              gpu_memory_utilization=args.gpu_memory_utilization)
    engine = llm.llm_engine
    prompt = [1] * args.context
    params = SamplingParams(temperature=0, max_tokens=10 * args.steps + 20, ignore_eos=True)
    req = engine.admit_computed("p", {"prompt_token_ids": prompt}, params, num_computed_tokens=args.context - 1)
    fill_random(engine, req, args.context)
    result = {}
    for mode, use_graph in (("eager", False), ("graph", True)):
        rows, total = profile_steps(engine, args.steps, use_graph)
        result[mode] = {"total_us": total, "kernels": rows}
        print(f"\n=== {mode}: GPU kernel time per step {total / 1e3:.3f} ms ({args.preset} {args.variant}, "
              f"context {args.context}) ===")
        print(f"{'us/step':>9} {'calls':>6} {'share':>6}  kernel")
        for name, us, calls in rows[:args.top]:
            print(f"{us:9.1f} {calls:6d} {us / total:6.1%}  {name}")
        cats = categorize(rows)
        result[mode]["categories"] = cats
        result[mode]["launches"] = sum(calls for _, _, calls in rows)
        print(f"--- by category ({result[mode]['launches']} launches/step)")
        for cat, us, calls in cats:
            print(f"{us:9.1f} {calls:6d} {us / total:6.1%}  {cat}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
