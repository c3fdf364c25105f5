"""Time each forward kernel of chunk_kda under several launch settings (for tuning).

Each setting is chunk_kda's `config` argument for one launch group; the kernels' CUDA times come from
torch.profiler over inference forwards (benchmarks/kda.py `kernel_breakdown`), next to the whole
forward (do_bench median). Real shape: H=32, K=V=128, bf16, gate + beta sigmoid + L2 norm in the kernel.

    python -m benchmarks.kda_parts [--shapes 16x4096,1x65536] [--fla]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench_ms, import_fla, log
from benchmarks.kda import BENCH, OPTS, kernel_breakdown, make_inputs
from kimi_linear.ops.kda.chunk import chunk_kda

# (what is timed: substrings of kernel names, launch group of chunk.CONFIG, its settings to try)
VARIANTS = [
    (("fwd_diag",), "intra", [dict(diag_warps=w) for w in (2, 4, 8)]),
    (("fwd_prep", "fwd_diag", "fwd_solve"), "intra",
     [dict(num_warps=pw, diag_warps=dw, solve_warps=sw) for pw, dw, sw in
      ((8, 2, 2), (8, 4, 2), (8, 2, 4), (8, 8, 2), (16, 2, 2))]),
    (("fwd_scan",), "scan", [dict(BV=64, num_warps=4, num_stages=2), dict(BV=64, num_warps=4, num_stages=3),
                             dict(BV=32, num_warps=4, num_stages=2), dict(BV=128, num_warps=8, num_stages=2)]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="16x4096,1x65536")
    ap.add_argument("--fla", action="store_true")
    args = ap.parse_args()
    fla_kda = import_fla("fla.ops.kda") if args.fla else None
    for s in args.shapes.split(","):
        B, T = (int(x) for x in s.split("x"))
        q, k, v, f, beta, A_log, dt_bias = make_inputs(B, T)
        kw = dict(A_log=A_log, dt_bias=dt_bias, output_final_state=True, **OPTS)
        with torch.no_grad():
            total = bench_ms(lambda: chunk_kda(q, k, v, f, beta, **kw), **BENCH)
            line = f"{B}x{T}: forward {total:.3f} ms"
            if fla_kda is not None:
                ft = bench_ms(lambda: fla_kda.chunk_kda(q, k, v, f, beta, **kw), **BENCH)
                line += f"  fla {ft:.3f} ms  (x fla {ft / total:.2f})"
        log(line)
        log("  kernels (ms/call): " + ", ".join(
            f"{name}={ms:.3f}" for name, ms in kernel_breakdown(B, T, backward=False).items()))
        for parts, group, cfgs in VARIANTS:
            for cfg in cfgs:
                try:
                    times = kernel_breakdown(B, T, {group: cfg}, backward=False)
                    ms = sum(t for name, t in times.items() if any(p in name for p in parts))
                    log(f"  {'+'.join(parts)} {cfg}: {ms:.3f} ms")
                except Exception as e:
                    log(f"  {'+'.join(parts)} {cfg}: failed {e!r}"[:300])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
