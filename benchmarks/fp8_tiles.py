"""Tile sweep of the FP8 decode kernels (M = 1) on this GPU: `fp8_gemm` at the shape's decode GEMMs and the
direct-mode FP8 fused MoE (k routed + the shared expert), each candidate timed in a CUDA graph (as the
engine's decode step runs them) beside bf16 cuBLAS / the bf16 fused MoE and the bytes-over-bandwidth floor.
Writes the winners (only where they beat the default by more than 3%) as JSON: a change of the defaults
(`ops/quant/fp8_gemm.py`'s `_tiles`, `ops/moe/fused_moe.py`'s DIRECT_TILES) is then measured in the engine.

    python -m benchmarks.fp8_tiles --out fp8_tiles.json [--preset 48b-a3b] [--budget-s 150]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from benchmarks.common import copy_bandwidth, graph_time_ms
from kimi_linear.tools.presets import preset_config

GEMM_CANDIDATES = [(16, bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512),
                                                                             (4, 8), (3, 4))]
MOE_CANDIDATES = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((32, 64), (128, 256, 512), (4,), (3, 4))]


def _time(fn) -> float:
    try:
        return graph_time_ms(lambda i: fn(), warmup=10, rep=50)
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
        print(f"    skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return float("inf")


def main() -> None:
    from kimi_linear.ops.moe.fused_moe import DIRECT_TILES, MoETiles, fused_moe
    from kimi_linear.ops.quant import quantize_fp8
    from kimi_linear.ops.quant.fp8_gemm import _tiles, fp8_gemm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="48b-a3b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=150, help="stop sweeping after this (the best so far is kept)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_tiles.py needs a CUDA GPU")
    t0 = time.time()
    bw = copy_bandwidth()
    base = preset_config(args.preset)
    D, la = base["hidden_size"], base["linear_attn_config"]
    H, K = la["num_heads"], la["head_dim"]
    Hm = base["num_attention_heads"]
    mla_in = Hm * (base["qk_nope_head_dim"] + base["qk_rope_head_dim"]) + base["kv_lora_rank"] + base["qk_rope_head_dim"]
    shapes = {"kda in": (3 * H * K + 2 * K + H, D), "mla in": (mla_in, D), "o_proj": (D, H * K),
              "dense gate_up": (2 * base["intermediate_size"], D), "dense down": (D, base["intermediate_size"])}
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; {len(GEMM_CANDIDATES)} GEMM and {2 * len(MOE_CANDIDATES)} MoE candidates")
    winners: dict = {"fp8_gemm": {}, "moe_direct_fp8": {}}
    print(f"{'gemm':<14} {'N x K':>12} {'bf16 us':>8} {'fp8 default us':>15} {'best us':>8} {'of BW':>6}  best tiles")
    for name, (N, Kd) in shapes.items():
        w = torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16) / Kd ** 0.5
        q, sc = quantize_fp8(w)
        x = torch.randn(1, Kd, device="cuda", dtype=torch.bfloat16)
        t_bf = _time(lambda: torch.nn.functional.linear(x, w)) * 1e3
        default = _tiles(1, N)
        t_def = _time(lambda: fp8_gemm(x, q, sc)) * 1e3
        best, t_best = default, t_def
        for c in GEMM_CANDIDATES:
            if time.time() - t0 > args.budget_s * 0.6:
                break
            t = _time(lambda: fp8_gemm(x, q, sc, tiles=c)) * 1e3
            if t < t_best:
                best, t_best = c, t
        frac = N * Kd / (t_best * 1e-6) / bw
        print(f"{name:<14} {N:>5} x {Kd:<5} {t_bf:8.1f} {t_def:15.1f} {t_best:8.1f} {frac:6.0%}  {best}", flush=True)
        if t_best < 0.97 * t_def:
            winners["fp8_gemm"][f"{N}x{Kd}"] = list(best)
        del w, q
    E, I, k = base["num_experts"] + 1, base["moe_intermediate_size"], base["num_experts_per_token"] + 1
    w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5
    w2 = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) / I ** 0.5
    q13, s13 = map(torch.stack, zip(*(quantize_fp8(w13[e]) for e in range(E))))
    q2, s2 = map(torch.stack, zip(*(quantize_fp8(w2[e]) for e in range(E))))
    ids = torch.cat([torch.randperm(E - 1, device="cuda")[:k - 1], torch.tensor([E - 1], device="cuda")])[None]
    tw = torch.rand(1, k, device="cuda")
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)

    def moe(t=None, fp8=True):
        if not fp8:
            return fused_moe(x, w13, w2, tw, ids, reduce=False)
        return fused_moe(x, q13, q2, tw, ids, reduce=False, w13_scale=s13, w2_scale=s2, direct_tiles=t)

    t_bf = _time(lambda: moe(fp8=False)) * 1e3
    t_def = _time(lambda: moe(DIRECT_TILES)) * 1e3
    up, down, t_best = DIRECT_TILES.up, DIRECT_TILES.down, t_def
    for part in ("up", "down"):
        for c in MOE_CANDIDATES:
            if time.time() - t0 > args.budget_s:
                break
            cand = MoETiles(16, c, down, 1) if part == "up" else MoETiles(16, up, c, 1)
            t = _time(lambda: moe(cand)) * 1e3
            if t < t_best:
                t_best = t
                up, down = cand.up, cand.down
    nbytes = k * 3 * I * D
    print(f"{'moe direct':<14} {k:>5} experts {t_bf:8.1f} {t_def:15.1f} {t_best:8.1f} {nbytes / (t_best * 1e-6) / bw:6.0%}"
          f"  up {up} down {down}  (floor fp8 {nbytes / bw * 1e6:.1f} us, bf16 {2 * nbytes / bw * 1e6:.1f} us)")
    if t_best < 0.97 * t_def:
        winners["moe_direct_fp8"] = {"up": list(up), "down": list(down)}
    with open(args.out, "w") as f:
        json.dump(winners, f, indent=1)
    print(f"wrote {args.out} after {time.time() - t0:.0f} s: {json.dumps(winners)}")


if __name__ == "__main__":
    main()
