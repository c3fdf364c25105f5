"""Time each forward kernel of chunk_kda alone, under several launch settings (for tuning).

Runs one forward at each shape with the launchers wrapped (recording their arguments), then replays
each launch with triton.testing.do_bench (every forward launch is idempotent), plus the whole
forward. Real shape: H=32, K=V=128, bf16, gate + beta sigmoid + L2 norm in the kernel.

    PYTHONPATH=. python benchmarks/kda_parts.py [--shapes 16x4096,1x65536] [--fla]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kda as kb  # noqa: E402  (benchmarks/kda.py: inputs, timing helpers, fla loader)

from kimi_linear.ops.kda import chunk as chunk_mod  # noqa: E402
from kimi_linear.ops.kda import chunk_intra  # noqa: E402
from kimi_linear.ops.kda.chunk import chunk_kda  # noqa: E402

VARIANTS = {
    "diag": [dict(num_warps=w) for w in (2, 4, 8)],
    "intra": [dict(num_warps=pw, diag_warps=dw, solve_warps=sw) for pw, dw, sw in
              ((8, 2, 2), (8, 4, 2), (8, 2, 4), (8, 8, 2), (16, 2, 2))],
    "scan": [dict(BV=64, num_warps=4, num_stages=2), dict(BV=64, num_warps=4, num_stages=3),
             dict(BV=32, num_warps=4, num_stages=2), dict(BV=128, num_warps=8, num_stages=2)],
}


def record(B, T):
    calls = {}
    orig_diag = chunk_intra.chunk_fwd_diag_launch
    orig_scan = chunk_mod.chunk_fwd_scan_launch
    orig_intra = chunk_mod.chunk_fwd_intra_launch

    def diag(*a, **kw):
        calls["diag"] = (orig_diag, a, kw)
        return orig_diag(*a, **kw)

    def scan(*a, **kw):
        calls["scan"] = (orig_scan, a, kw)
        return orig_scan(*a, **kw)

    def intra(*a, **kw):
        calls["intra_all"] = (orig_intra, a, kw)
        return orig_intra(*a, **kw)

    chunk_intra.chunk_fwd_diag_launch, chunk_mod.chunk_fwd_scan_launch = diag, scan
    chunk_mod.chunk_fwd_intra_launch = intra
    try:
        q, k, v, f, beta, A_log, dt_bias = kb.make_inputs(B, T)
        with torch.no_grad():
            o, _ = chunk_kda(q, k, v, f, beta, A_log=A_log, dt_bias=dt_bias, output_final_state=True, **kb.OPTS)
    finally:
        chunk_intra.chunk_fwd_diag_launch, chunk_mod.chunk_fwd_scan_launch = orig_diag, orig_scan
        chunk_mod.chunk_fwd_intra_launch = orig_intra
    calls["_keep"] = (q, k, v, f, beta, A_log, dt_bias, o)
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="16x4096,1x65536")
    ap.add_argument("--fla", action="store_true")
    args = ap.parse_args()
    fla = kb.load_fla() if args.fla else None
    for s in args.shapes.split(","):
        B, T = (int(x) for x in s.split("x"))
        calls = record(B, T)
        q, k, v, f, beta, A_log, dt_bias, _ = calls["_keep"]
        kw = dict(A_log=A_log, dt_bias=dt_bias, output_final_state=True, **kb.OPTS)
        with torch.no_grad():
            total = kb.bench_ms(lambda: chunk_kda(q, k, v, f, beta, **kw))
        line = f"{B}x{T}: forward {total:.3f} ms"
        if fla is not None:
            with torch.no_grad():
                ft = kb.bench_ms(lambda: fla(q, k, v, f, beta, **kw))
            line += f"  fla {ft:.3f} ms  (x fla {ft / total:.2f})"
        kb.log(line)
        fn, a, kwi = calls["intra_all"]
        kb.log(f"  intra launch (prep + diag + solve) {kb.bench_ms(lambda: fn(*a, **kwi)):.3f} ms  {kwi}")
        for name in ("diag", "scan"):
            fn, a, kw0 = calls[name]
            for cfg in VARIANTS[name]:
                try:
                    ms = kb.bench_ms(lambda: fn(*a, **{**kw0, **cfg}))
                    kb.log(f"  {name} {cfg}: {ms:.3f} ms")
                except Exception as e:
                    kb.log(f"  {name} {cfg}: failed {e!r}"[:300])
        fn, a, kwi = calls["intra_all"]
        for cfg in VARIANTS["intra"]:
            try:
                both = kb.bench_ms(lambda: fn(*a, **{**kwi, **cfg}))
                kb.log(f"  prep+diag+solve {cfg}: {both:.3f} ms")
            except Exception as e:
                kb.log(f"  prep+diag+solve {cfg}: failed {e!r}"[:300])
        del calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
