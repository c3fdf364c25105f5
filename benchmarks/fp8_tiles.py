"""Tile sweep of the FP8 decode kernels (M = 1 by default) on this GPU: `fp8_gemm`'s two kernels at the shape's
decode GEMMs (the MMA kernel, `fp8_gemm.py`, and the GEMV, `fp8_gemv.py`) and the direct-mode FP8 fused MoE
(k routed + the shared expert; its MMA kernels and its GEMVs, `fused_moe_gemv.py`), each candidate timed in a
CUDA graph (as the engine's decode step runs them) beside bf16 cuBLAS / the bf16 fused MoE and the
bytes-over-bandwidth floor. Each row prints: bf16, the old (MMA) FP8 default and best, the new (GEMV) FP8
default and best, the FP8 floor, the new best's share of copy bandwidth and its speed-up over bf16. Every
kernel's default output is checked against the dequantized fp32 reference first.
Writes the winners (only where they beat the kernel's default by more than 3%) as JSON: a change of the
defaults (`fp8_gemm._tiles`, `fp8_gemv.gemv_tiles`, `fused_moe.DIRECT_TILES`, `fused_moe_gemv.gemv_tiles`)
is then measured in the engine.

    python -m benchmarks.fp8_tiles --out fp8_tiles.json [--preset 48b-a3b] [--budget-s 115] [--rows 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from benchmarks.common import copy_bandwidth, graph_time_ms, rel_err
from kimi_linear.tools.presets import preset_config

GEMM_CANDIDATES = [(16, bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512),
                                                                             (4, 8), (3, 4))]
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
GEMV_CANDIDATES = [(bn, bk, sk, w, s) for (bn, bk), sk, (w, s) in itertools.product(
    ((8, 512), (16, 256), (16, 512), (32, 128), (32, 256), (64, 128)), (1, 2, 4, 8), ((4, 2), (4, 3), (8, 2)))]
MOE_CANDIDATES = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((32, 64), (128, 256, 512), (4,), (3, 4))]
MOE_GEMV_CANDIDATES = [(bn, bk, sk, w, s) for (bn, bk), sk, (w, s) in itertools.product(
    ((8, 256), (16, 256), (16, 512), (32, 128), (32, 256)), (1, 2), ((4, 2), (8, 3)))]


def _time(fn) -> float:
    """Microseconds per call of fn() replayed in a CUDA graph (inf if it does not compile or fit)."""
    try:
        return graph_time_ms(lambda i: fn(), warmup=5, rep=25) * 1e3
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
        print(f"    skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return float("inf")


def _sweep(fn, default, candidates, deadline: float, log: list | None = None) -> tuple[object, float, float, int]:
    """(best tiles, best us, default us, candidates tried) of fn(tiles) until time.time() passes deadline;
    `log` (when given) gets [tiles, us] of every candidate timed, so a tile rule can be fitted to the sweep."""
    t_def = _time(lambda: fn(default))
    best, t_best, tried = default, t_def, 0
    for c in candidates:
        if time.time() > deadline:
            break
        t = _time(lambda: fn(c))
        tried += 1
        if log is not None:
            log.append([list(c), round(t, 2)])
        if t < t_best:
            best, t_best = c, t
    return best, t_best, t_def, tried


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="48b-a3b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=115, help="stop sweeping after this (the best so far is kept)")
    ap.add_argument("--rows", type=int, default=1, help="rows of x (decode batch) of the GEMMs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_tiles.py needs a CUDA GPU")
    from kimi_linear.ops.moe.fused_moe import DIRECT_TILES, MoETiles, fused_moe
    from kimi_linear.ops.moe.fused_moe_gemv import MoEGemvTiles, gemv_tiles as moe_gemv_tiles
    from kimi_linear.ops.quant import dequantize_fp8, quantize_fp8
    from kimi_linear.ops.quant.fp8_gemm import _tiles, fp8_gemm
    from kimi_linear.ops.quant.fp8_gemv import gemv_tiles

    t0 = time.time()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base = preset_config(args.preset)
    D, la = base["hidden_size"], base["linear_attn_config"]
    H, K = la["num_heads"], la["head_dim"]
    Hm = base["num_attention_heads"]
    mla_in = Hm * (base["qk_nope_head_dim"] + base["qk_rope_head_dim"]) + base["kv_lora_rank"] + base["qk_rope_head_dim"]
    shapes = {"kda in": (3 * H * K + 2 * K + H, D), "mla in": (mla_in, D), "o_proj": (D, H * K),
              "dense gate_up": (2 * base["intermediate_size"], D), "dense down": (D, base["intermediate_size"])}
    M = args.rows
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s, {sms} SMs, M = {M}; {len(GEMM_CANDIDATES)} MMA and "
          f"{len(GEMV_CANDIDATES)} GEMV candidates per GEMM, {2 * len(MOE_CANDIDATES)} MMA and "
          f"{2 * len(MOE_GEMV_CANDIDATES)} GEMV MoE candidates (us per call, CUDA graph)")
    winners: dict = {"fp8_gemm": {}, "fp8_gemv": {}, "moe_direct_fp8": {}, "moe_gemv_fp8": {}}
    rows = []
    print(f"{'gemm':<14} {'N x K':>12} {'bf16':>7} {'mma def':>8} {'mma best':>8} {'gemv def':>8} {'gemv best':>9} "
          f"{'floor':>6} {'of BW':>6} {'vs bf16':>7}  best gemv tiles (tried)")
    gemm_end = t0 + args.budget_s * 0.75
    for i, (name, (N, Kd)) in enumerate(shapes.items()):
        w = torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16) / Kd ** 0.5
        q, sc = quantize_fp8(w)
        x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ dequantize_fp8(q, sc).double().t()
        for gemv in (False, True):
            err = rel_err(ref, fp8_gemm(x, q, sc, gemv=gemv))
            if err > 1e-2:
                raise SystemExit(f"{name}: fp8_gemm(gemv={gemv}) relative error {err:.2e} > 1e-2")
        t_bf = _time(lambda: torch.nn.functional.linear(x, w))
        slot = (gemm_end - time.time()) / (len(shapes) - i)  # this shape's share of the time left
        mma, t_mma, t_mma_def, _ = _sweep(lambda c: fp8_gemm(x, q, sc, tiles=c, gemv=False), _tiles(M, N),
                                          GEMM_CANDIDATES, time.time() + 0.3 * slot)
        gv_def = gemv_tiles(M, N, Kd, num_sms=sms)
        gv_log: list = []
        gv, t_gv, t_gv_def, tried = _sweep(lambda c: fp8_gemm(x, q, sc, tiles=c, gemv=True), gv_def,
                                           GEMV_CANDIDATES, time.time() + 0.7 * slot, gv_log)
        floor = N * Kd / bw * 1e6
        print(f"{name:<14} {N:>5} x {Kd:<5} {t_bf:7.1f} {t_mma_def:8.1f} {t_mma:8.1f} {t_gv_def:8.1f} {t_gv:9.1f} "
              f"{floor:6.1f} {floor / t_gv:6.0%} {t_bf / t_gv:6.2f}x  {gv} ({tried}, default {gv_def})", flush=True)
        rows.append(dict(name=name, N=N, K=Kd, M=M, bf16_us=t_bf, mma_default_us=t_mma_def, mma_best_us=t_mma,
                         mma_best=list(mma), gemv_default_us=t_gv_def, gemv_best_us=t_gv, gemv_best=list(gv),
                         gemv_default=list(gv_def), floor_us=floor, gemv_candidates=gv_log))
        if t_mma < 0.97 * t_mma_def:
            winners["fp8_gemm"][f"{N}x{Kd}"] = list(mma)
        if t_gv < 0.97 * t_gv_def:
            winners["fp8_gemv"][f"{N}x{Kd}"] = list(gv)
        del w, q

    E, I, k = base["num_experts"] + 1, base["moe_intermediate_size"], base["num_experts_per_token"] + 1
    w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5
    w2 = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) / I ** 0.5
    q13, s13 = map(torch.stack, zip(*(quantize_fp8(w13[e]) for e in range(E))))
    q2, s2 = map(torch.stack, zip(*(quantize_fp8(w2[e]) for e in range(E))))
    ids = torch.cat([torch.randperm(E - 1, device="cuda")[:k - 1], torch.tensor([E - 1], device="cuda")])[None]
    tw = torch.rand(1, k, device="cuda")
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)

    def moe(t=None, fp8=True, gemv=False):
        if not fp8:
            return fused_moe(x, w13, w2, tw, ids, reduce=False)
        return fused_moe(x, q13, q2, tw, ids, reduce=False, w13_scale=s13, w2_scale=s2, direct_tiles=t, gemv=gemv)

    ref = moe(fp8=False)[0].float()  # bf16 weights: the FP8 paths differ by the weights' quantization only
    for gemv in (False, True):
        err = rel_err(ref, moe(gemv=gemv)[0].float())
        if err > 0.1:
            raise SystemExit(f"moe direct: fp8 (gemv={gemv}) vs bf16 relative error {err:.2e} > 0.1")
    t_bf = _time(lambda: moe(fp8=False))
    moe_end = t0 + args.budget_s

    def sweep_parts(make, default_up, default_down, candidates, share: float):
        up, down = default_up, default_down
        t_def = _time(lambda: moe(make(up, down), gemv=make is MoEGemvTiles))
        t_best, tried = t_def, 0
        deadline = time.time() + share * (moe_end - time.time())
        for part in ("up", "down"):
            for c in candidates:
                if time.time() > deadline:
                    break
                cand = make(c, down) if part == "up" else make(up, c)
                t = _time(lambda: moe(cand, gemv=make is MoEGemvTiles))
                tried += 1
                if t < t_best:
                    t_best, up, down = t, cand.up, cand.down
        return up, down, t_best, t_def, tried

    mu, md, t_mma, t_mma_def, _ = sweep_parts(lambda u, d: MoETiles(16, u, d, 1), DIRECT_TILES.up,
                                              DIRECT_TILES.down, MOE_CANDIDATES, 0.35)
    gdef = moe_gemv_tiles(k, D, I, num_sms=sms)
    gu, gd, t_gv, t_gv_def, tried = sweep_parts(MoEGemvTiles, gdef.up, gdef.down, MOE_GEMV_CANDIDATES, 1.0)
    nbytes = k * 3 * I * D
    floor = nbytes / bw * 1e6
    print(f"{'moe direct':<14} {k:>5} experts {t_bf:7.1f} {t_mma_def:8.1f} {t_mma:8.1f} {t_gv_def:8.1f} {t_gv:9.1f} "
          f"{floor:6.1f} {floor / t_gv:6.0%} {t_bf / t_gv:6.2f}x  up {gu} down {gd} ({tried}, default {gdef}; "
          f"mma best up {mu} down {md}; bf16 floor {2 * floor:.1f} us)")
    rows.append(dict(name="moe direct", pairs=k, bf16_us=t_bf, mma_default_us=t_mma_def, mma_best_us=t_mma,
                     gemv_default_us=t_gv_def, gemv_best_us=t_gv, gemv_best={"up": list(gu), "down": list(gd)},
                     floor_us=floor))
    if t_mma < 0.97 * t_mma_def:
        winners["moe_direct_fp8"] = {"up": list(mu), "down": list(md)}
    if t_gv < 0.97 * t_gv_def:
        winners["moe_gemv_fp8"] = {"up": list(gu), "down": list(gd)}
    with open(args.out, "w") as f:
        json.dump({"copy_bandwidth": bw, "rows": rows, "winners": winners}, f, indent=1)
    print(f"wrote {args.out} after {time.time() - t0:.0f} s: {json.dumps(winners)}")


if __name__ == "__main__":
    main()
