"""The MLA prefill attention kernel alone (`ops/mla/prefill.py`, MHA form) over one expanded key chunk, at the
real head shape (H=32, Dn=128, Dr=64, Dv=128, bf16), under several tile configurations: TFLOP/s beside a bf16
matmul measured in the same run, and each configuration's output checked against the default's (and the
default against an fp32 reference on a small case first).

    python -m benchmarks.mla_prefill [--tiles 64x64x4x3,128x64x8x3,128x64x8x2,128x32x8x3] [--json OUT]
    TRITON_INTERPRET=1 python -m benchmarks.mla_prefill --device cpu --small   # smoke test (tests/ops)

Rows: a 16K-query chunk over a full 32K-key chunk before it (most of a long prefill: no mask) and the causal
first chunk (16K queries over their own 16K keys). FLOPs: 2 * H * (Dn + Dr + Dv) per visible (query, key) pair.
A configuration is BLOCK_M x BLOCK_N x num_warps x num_stages (`prefill.TILES`, the default, first).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import bench_ms, log, matmul_rate, rel_err, wall_ms
from kimi_linear.ops.mla import prefill as P

H, DN, DR, DV = 32, 128, 64, 128
SCALE = (DN + DR) ** -0.5


def parse_tiles(spec: str) -> tuple[int, int, int, int]:
    try:
        bm, bn, w, s = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--tiles: {spec!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES (e.g. 128x64x8x3)") from None
    return bm, bn, w, s


def inputs(T: int, KC: int, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(T, H, DN + DR, device=device, dtype=torch.bfloat16, generator=g)
    kv = torch.randn(KC, H, DN + DV, device=device, dtype=torch.bfloat16, generator=g)
    kpe = torch.randn(KC, DR, device=device, dtype=torch.bfloat16, generator=g)
    return q, kv, kpe


def run(q, kv, kpe, q_pos0: int, first: bool, tiles):
    T = q.shape[0]
    o = torch.zeros(T, H, DV, device=q.device, dtype=torch.bfloat16)
    lse = torch.zeros(T, H, device=q.device, dtype=torch.float32)
    if not first:  # a previous chunk's output to merge with (the same for every configuration; lse 0: finite)
        o.normal_(generator=torch.Generator(device=q.device).manual_seed(7))
    saved, P.TILES = P.TILES, tiles
    try:
        fn = lambda: P._attend_chunk(q, kv, kpe, o, lse, SCALE, q_pos0, 0, DN, DV, first)  # noqa: E731
        prev = o.clone()
        fn()
        out = o.clone()
        if q.is_cuda:
            ms = bench_ms(lambda: (o.copy_(prev), fn()), warmup=3, rep=10)
        else:
            o.copy_(prev)
            ms = wall_ms(fn)
    finally:
        P.TILES = saved
    return out, ms


def reference_check(tiles, device: str, T: int = 256) -> float:
    """The kernel vs fp32 softmax attention, causal first chunk of T queries."""
    q, kv, kpe = inputs(T, T, device, seed=1)
    out, _ = run(q, kv, kpe, 0, True, tiles)
    qf, kvf, kpf = q.float(), kv.float(), kpe.float()
    s = torch.einsum("thd,khd->htk", qf[..., :DN], kvf[..., :DN]) + torch.einsum("thd,kd->htk", qf[..., DN:], kpf)
    s = s * SCALE + torch.triu(torch.full((T, T), float("-inf"), device=device), 1)
    ref = torch.einsum("htk,khd->thd", s.softmax(-1), kvf[..., DN:])
    return rel_err(ref, out.float())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", default="64x64x4x3,128x64x8x3,128x64x8x2,128x32x8x3")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (with --small)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (the smoke test)")
    args = ap.parse_args(argv)
    configs = [P.TILES] + [t for t in (parse_tiles(x) for x in args.tiles.split(",")) if t != P.TILES]
    cuda = args.device == "cuda"
    if not cuda:  # under the interpreter: the tests' fixes of its own bugs (bf16 dots, int32 masks)
        import os
        import sys

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        import triton_interpreter

        triton_interpreter.apply()
    peak = matmul_rate(device=args.device, n=8192 if cuda else 256)
    name = torch.cuda.get_device_name() if cuda else args.device
    log(f"{name}: bf16 matmul {peak / 1e12:.1f} TFLOP/s; default tiles {P.TILES}")
    err = reference_check(P.TILES, args.device, 256 if not args.small else 48)
    log(f"default vs fp32 reference (causal queries): rel err {err:.1e}")
    if err > 2e-2:
        raise SystemExit(f"the default kernel is off the fp32 reference: rel err {err:.1e}")
    rows = [("16K queries x 32K earlier keys", 16384, 32768, 32768, False),
            ("16K queries, causal first chunk", 16384, 16384, 0, True)]
    if args.small:
        rows = [("48 queries x 64 earlier keys", 48, 64, 64, False), ("48 queries, causal", 48, 48, 0, True)]
    results = []
    for name, T, KC, q_pos0, first in rows:
        q, kv, kpe = inputs(T, KC, args.device)
        pairs = T * KC if not first else T * (T + 1) // 2
        flops = 2 * H * (DN + DR + DV) * pairs
        base = None
        for tiles in configs:
            try:
                out, ms = run(q, kv, kpe, q_pos0, first, tiles)
            except Exception as e:  # a configuration that does not fit (shared memory) is reported, not fatal
                log(f"  {name}: tiles {tiles}: {type(e).__name__}: {str(e)[:160]}")
                results.append(dict(row=name, tiles=tiles, error=str(e)[:300]))
                continue
            base = out if base is None else base
            diff = rel_err(base.float(), out.float())
            tf = flops / (ms * 1e-3) / 1e12
            log(f"  {name}: tiles {tiles}: {ms:.2f} ms, {tf:.0f} TFLOP/s ({tf * 1e12 / peak:.0%} of the matmul), "
                f"vs default {diff:.1e}{'  MISMATCH' if diff > 1e-2 else ''}")
            results.append(dict(row=name, tiles=tiles, ms=ms, tflops=tf, of_matmul=tf * 1e12 / peak, vs_default=diff))
        del q, kv, kpe
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, matmul_tflops=peak / 1e12, ref_err=err,
                           results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
