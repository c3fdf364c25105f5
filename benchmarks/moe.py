"""Fused MoE experts (Triton) vs the naive expert loop and vs the physical floor; the fused router.

Real shape: E=64 routed experts (the 48B-A3B-e64 preset; 8 of them are read per token either way),
k=8, D=2304, I=1024, bf16, random weights and inputs, uniformly random distinct experts per token,
weights in (0.1, 1.1). For each N in {1, 16, 256, 4096, 16384}:
  check   rel err of `fused_moe` vs the fp32 oracle (`naive_moe_experts` on fp32 copies) and vs the
          naive loop in bf16,
  ours    `fused_moe` (median of `triton.testing.do_bench`, L2 flushed between calls); for N <= 256
          also replayed from a CUDA graph (the decode path),
  naive   `naive_moe_experts` (host-synced loop over the experts hit),
  floor   max(bytes / copy bandwidth, FLOPs / matmul rate): bytes = distinct experts touched x
          3 x D x I x 2 + x + y; FLOPs = 2 x N x k x 3 x D x I; both ceilings measured in this run.
Then the router (fused vs torch, CUDA-graph replays), per-kernel times (profiler) and a sweep over
tile configs (each checked against the oracle; graph replays for N <= 256).

    python -m benchmarks.moe [--json out.json] [--sweep-seconds 150]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import bench_ms, copy_bandwidth, graph_time_ms, matmul_rate, rel_err
from kimi_linear.ops.moe import naive_moe_experts, sigmoid_grouped_topk
from kimi_linear.ops.moe.fused_moe import MoETiles, fused_moe, pick_tiles
from kimi_linear.ops.moe.routing import fused_sigmoid_grouped_topk

E, K, D, I = 64, 8, 2304, 1024
NS = (1, 16, 256, 4096, 16384)
DEVICE = "cuda"
SWEEP = {
    "decode": [MoETiles(16, (32, 256, 4, 3), (64, 256, 4, 3), 1), MoETiles(16, (64, 256, 4, 3), (128, 128, 4, 3), 1),
               MoETiles(16, (128, 128, 4, 3), (64, 128, 4, 5), 1), MoETiles(16, (32, 128, 4, 5), (32, 256, 4, 4), 1)],
    "mid": [MoETiles(16, (64, 128, 4, 4), (64, 128, 4, 4), 1), MoETiles(64, (64, 128, 4, 3), (128, 64, 4, 4), 8),
            MoETiles(32, (128, 64, 4, 3), (128, 64, 4, 3), 4)],
    "prefill": [MoETiles(64, (64, 64, 4, 4), (128, 64, 4, 4), 8), MoETiles(128, (64, 64, 4, 4), (128, 128, 8, 3), 8),
                MoETiles(128, (128, 64, 8, 4), (256, 64, 8, 3), 16), MoETiles(128, (64, 128, 4, 3), (128, 128, 4, 3), 8)],
}


BENCH = dict(warmup=10, rep=60)


def bench(fn) -> float:
    """Seconds per call (do_bench median)."""
    return bench_ms(fn, **BENCH) * 1e-3


def graph_time(fn) -> float:
    """Seconds per replay of fn captured in a CUDA graph."""
    return graph_time_ms(lambda i: fn(), **BENCH) * 1e-3


def routing(N: int, gen: torch.Generator):
    ids = torch.rand(N, E, device=DEVICE, generator=gen).argsort(dim=1)[:, :K]
    return torch.rand(N, K, device=DEVICE, generator=gen) + 0.1, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write all rows as JSON here")
    ap.add_argument("--sweep-seconds", type=float, default=150.0, help="time budget of the tile sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    bw, rate = copy_bandwidth(), matmul_rate()  # bytes/s, FLOP/s
    print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s",
          flush=True)
    w13 = (torch.randn(E, 2 * I, D, device=DEVICE, generator=gen) / D**0.5).bfloat16()
    w2 = (torch.randn(E, D, I, device=DEVICE, generator=gen) / I**0.5).bfloat16()
    w13f, w2f = w13.float(), w2.float()
    expert_bytes = 3 * D * I * 2

    rows, inputs = [], {}
    for N in NS:
        x = torch.randn(N, D, device=DEVICE, generator=gen).bfloat16()
        tw, ids = routing(N, gen)
        inputs[N] = (x, tw, ids)
        got = fused_moe(x, w13, w2, tw, ids)
        err_fp32 = rel_err(naive_moe_experts(x.float(), w13f, w2f, tw, ids), got.float())
        err_bf16 = rel_err(naive_moe_experts(x, w13, w2, tw, ids).float(), got.float())
        t_ours = bench(lambda: fused_moe(x, w13, w2, tw, ids))
        t_graph = graph_time(lambda: fused_moe(x, w13, w2, tw, ids)) if N <= 256 else None
        t_naive = bench(lambda: naive_moe_experts(x, w13, w2, tw, ids))
        touched = int(torch.unique(ids).numel())
        nbytes = touched * expert_bytes + 2 * N * D * 2
        flops = 2 * N * K * 3 * D * I
        floor = max(nbytes / bw, flops / rate)
        best = min(t for t in (t_ours, t_graph) if t is not None)
        row = dict(N=N, tiles=str(pick_tiles(N * K, E)), err_fp32=err_fp32, err_bf16=err_bf16, ours_us=t_ours * 1e6,
                   graph_us=None if t_graph is None else t_graph * 1e6, naive_us=t_naive * 1e6,
                   floor_us=floor * 1e6, floor_kind="bytes" if nbytes / bw >= flops / rate else "flops",
                   experts_touched=touched, ours_over_floor=best / floor, speedup_vs_naive=t_naive / best,
                   achieved_TBps=nbytes / best / 1e12, achieved_TFLOPs=flops / best / 1e12)
        rows.append(row)
        print(json.dumps(row), flush=True)

    router = []
    for Er in (64, 256):
        gw = (torch.randn(Er, D, device=DEVICE, generator=gen) * 0.02).bfloat16()
        bias = torch.randn(Er, device=DEVICE, generator=gen) * 0.01
        for N in (NS[0], NS[1], NS[-2]):
            x = inputs[N][0]
            rw, rids = sigmoid_grouped_topk(x, gw, bias, K, 1, 1, True, 2.446)
            fw, fids = fused_sigmoid_grouped_topk(x, gw, bias, K, 1, 1, True, 2.446)
            same = (rids.sort(1).values == fids.sort(1).values).all(1).float().mean().item()
            t_f = graph_time(lambda: fused_sigmoid_grouped_topk(x, gw, bias, K, 1, 1, True, 2.446))
            t_t = graph_time(lambda: sigmoid_grouped_topk(x, gw, bias, K, 1, 1, True, 2.446))
            r = dict(E=Er, N=N, same_experts=same, fused_graph_us=t_f * 1e6, torch_graph_us=t_t * 1e6)
            router.append(r)
            print(json.dumps(r), flush=True)

    breakdown = {}
    for N in (NS[0], NS[-1]):  # per-kernel GPU time of one call
        x, tw, ids = inputs[N]
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fused_moe(x, w13, w2, tw, ids)
                torch.cuda.synchronize()
        except Exception as exc:  # the profiler is a diagnostic only
            print(f"kernels N={N}: profiler failed: {exc!r}", flush=True)
            continue
        breakdown[N] = {e.key: e.self_device_time_total / 5 for e in prof.key_averages()
                        if e.self_device_time_total > 0}
        print(f"kernels N={N}: " + ", ".join(f"{k} {v:.1f} us" for k, v in breakdown[N].items()), flush=True)

    sweep, t0 = [], time.time()
    for N in sorted(NS, key=lambda n: (n not in (NS[0], NS[-1]), n)):  # the extremes first
        regime = "decode" if N <= 16 else "mid" if N <= 256 else "prefill"
        x, tw, ids = inputs[N]
        ref = naive_moe_experts(x.float(), w13f, w2f, tw, ids)
        for tiles in SWEEP[regime]:
            if time.time() - t0 > args.sweep_seconds:
                break
            got = fused_moe(x, w13, w2, tw, ids, tiles=tiles)
            call = lambda: fused_moe(x, w13, w2, tw, ids, tiles=tiles)  # noqa: E731
            t = graph_time(call) if N <= 256 else bench(call)  # decode sizes: launch overhead excluded
            s = dict(N=N, tiles=str(tiles), err_fp32=rel_err(ref, got.float()), us=t * 1e6)
            sweep.append(s)
            print(json.dumps(s), flush=True)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(copy_TBps=bw / 1e12, matmul_TFLOPs=rate / 1e12, moe=rows, router=router,
                           kernels_us=breakdown, sweep=sweep),
                      fh, indent=1)
    print(f"\nMoE experts, E={E} k={K} D={D} I={I} bf16 ({torch.cuda.get_device_name()}, copy {bw / 1e12:.2f} TB/s, "
          f"matmul {rate / 1e12:.0f} TFLOP/s)")
    print(f"{'N':>6} {'err fp32':>9} {'ours us':>9} {'graph us':>9} {'naive us':>9} {'floor us':>9} {'kind':>5} "
          f"{'ours/floor':>10} {'vs naive':>8}")
    for r in rows:
        g = f"{r['graph_us']:9.1f}" if r["graph_us"] is not None else f"{'-':>9}"
        print(f"{r['N']:>6} {r['err_fp32']:9.2e} {r['ours_us']:9.1f} {g} {r['naive_us']:9.1f} {r['floor_us']:9.1f} "
              f"{r['floor_kind']:>5} {r['ours_over_floor']:10.2f} {r['speedup_vs_naive']:7.1f}x")
    for N in NS:
        cand = [s for s in sweep if s["N"] == N and s["err_fp32"] < 1e-2]
        if cand:
            b = min(cand, key=lambda s: s["us"])
            print(f"sweep N={N}: best {b['us']:.1f} us with {b['tiles']}")


if __name__ == "__main__":
    main()
