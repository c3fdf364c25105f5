"""MLA decode (absorbed, split-KV over the paged latent cache) vs the copy-bandwidth floor, before/after.

Real shape (H=32, Dn=128, Dr=64, Dv=128, R=512), bf16, block size 64, scattered block tables, random
cache contents. For each (batch, context) it checks sequence 0 and the last sequence against the fp32
naive absorbed form, then times (median of `triton.testing.do_bench`, L2 flushed between calls):
  attn    the two Triton kernels only (absorbed query given), the default launch,
  eager   the whole `mla_decode` (W_UK bmm, kernels, W_UV bmm),
  graph   the whole `mla_decode` replayed from a CUDA graph,
  before  `attn` / `graph` of the previous kernel pair (`legacy=True`: head-major split kernel, 4 warps,
          32-token tiles, split-serial reduction) in the same run,
against floor = cache bytes / measured device copy bandwidth (read + write counted).
Then a sweep of attention-kernel variants at batch 1 / 1M (each checked against the default's output)
and of the split floor (min_chunk) at batch 1 / 4K in a CUDA graph. `--prefill` adds the prefill
kernel beside torch SDPA.

    PYTHONPATH=. python benchmarks/mla_decode.py [--quick] [--prefill] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.testing

from kimi_linear.ops.mla.decode import decode_num_splits, mla_decode, mla_decode_attention, reference_decode

H, DN, DR, DV, R = 32, 128, 64, 128, 512
BS = 64
SCALE = (DN + DR) ** -0.5
BYTES_PER_TOKEN = (R + DR) * 2
DEVICE = "cuda"


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


def copy_bandwidth() -> float:
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=DEVICE)  # 2 GiB
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 2 / t
    del src, dst
    return bw


def make_batch(N: int, ctx: int, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    nbps = triton.cdiv(ctx, BS)
    NB = N * nbps + 1
    cache = torch.randn(NB, BS, R + DR, device=DEVICE, dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(NB, device=DEVICE, generator=g)[:N * nbps].view(N, nbps).to(torch.int32)
    q = torch.randn(N, H, DN + DR, device=DEVICE, dtype=torch.bfloat16, generator=g)
    w = (torch.randn(H * (DN + DV), R, device=DEVICE, generator=g) / R ** 0.5).to(torch.bfloat16)
    lens = torch.full((N,), ctx, dtype=torch.int32, device=DEVICE)
    return q, cache, tables, lens, w


def absorbed_query(q, w):
    wv = w.view(H, DN + DV, R)
    return torch.bmm(q[..., :DN].transpose(0, 1), wv[:, :DN]), q[..., DN:]


def check(q, cache, tables, lens, w, out) -> float:
    worst = 0.0
    for n in sorted({0, q.shape[0] - 1}):
        ref = reference_decode(q[n:n + 1], cache, tables[n:n + 1], lens[n:n + 1], w, DV, SCALE)
        worst = max(worst, ((out[n:n + 1].float() - ref).norm() / ref.norm()).item())
    return worst


def graph_time(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay)


def decode_rows(shapes, bw):
    rows = []
    for N, ctx in shapes:
        q, cache, tables, lens, w = make_batch(N, ctx)
        extras, old_extras = {}, {}
        out = mla_decode(q, cache, tables, lens, w, DV, SCALE, extras)
        err = check(q, cache, tables, lens, w, out)
        err_old = check(q, cache, tables, lens, w, mla_decode(q, cache, tables, lens, w, DV, SCALE, {}, legacy=True))
        q_lat, q_pe = absorbed_query(q, w)
        t_attn = bench(lambda: mla_decode_attention(q_lat, q_pe, cache, tables, lens, SCALE, extras))
        t_eager = bench(lambda: mla_decode(q, cache, tables, lens, w, DV, SCALE, extras))
        t_graph = graph_time(lambda: mla_decode(q, cache, tables, lens, w, DV, SCALE, extras))
        t_attn_old = bench(lambda: mla_decode_attention(q_lat, q_pe, cache, tables, lens, SCALE, old_extras,
                                                        legacy=True))
        t_graph_old = graph_time(lambda: mla_decode(q, cache, tables, lens, w, DV, SCALE, old_extras, legacy=True))
        nbytes = N * ctx * BYTES_PER_TOKEN
        floor = nbytes / bw
        rows.append(dict(batch=N, context=ctx, splits=decode_num_splits(N, H, q.device), cache_GB=nbytes / 1e9,
                         rel_err=err, rel_err_before=err_old, attn_us=t_attn * 1e6, eager_us=t_eager * 1e6,
                         graph_us=t_graph * 1e6, before_attn_us=t_attn_old * 1e6, before_graph_us=t_graph_old * 1e6,
                         floor_us=floor * 1e6, attn_TBps=nbytes / t_attn / 1e12,
                         attn_over_floor=t_attn / floor, graph_over_floor=t_graph / floor))
        r = rows[-1]
        print(f"  N={N:4d} ctx={ctx:8d} err={err:.1e} attn={r['attn_us']:9.1f}us (before {r['before_attn_us']:9.1f}) "
              f"graph={r['graph_us']:9.1f}us (before {r['before_graph_us']:9.1f}) floor={r['floor_us']:9.1f}us "
              f"({r['attn_TBps']:.2f} TB/s)", flush=True)
        del q, cache, tables, lens, w, extras, old_extras, q_lat, q_pe, out
        torch.cuda.empty_cache()
    return rows


def sweep(bw, ctx):
    """Attention-kernel variants at batch 1; each output compared with the default's."""
    q, cache, tables, lens, w = make_batch(1, ctx)
    q_lat, q_pe = absorbed_query(q, w)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [dict(), dict(num_splits=2 * sms), dict(num_splits=3 * sms), dict(num_splits=sms // 2),
               dict(prefetch=False, num_stages=2),  # Triton's own pipeliner instead of register double buffering
               dict(prefetch=False, num_stages=1),  # no overlap at all
               dict(block_n=32),                    # 32-token tiles (mma.sync for S, 72 KB shared memory)
               dict(legacy=True), dict(legacy=True, num_warps=8)]
    ref, rows = None, []
    nbytes = ctx * BYTES_PER_TOKEN
    for cfg in configs:
        try:
            o = mla_decode_attention(q_lat, q_pe, cache, tables, lens, SCALE, {}, **cfg)
            if ref is None:
                ref = o.float()
            err = ((o.float() - ref).norm() / ref.norm()).item()
            t = bench(lambda: mla_decode_attention(q_lat, q_pe, cache, tables, lens, SCALE, {}, **cfg))
            rows.append(dict(cfg=cfg or "default", us=t * 1e6, TBps=nbytes / t / 1e12, over_floor=t * bw / nbytes,
                             diff_vs_default=err))
            print(f"  {str(cfg or 'default'):50s} {t * 1e6:8.1f}us {nbytes / t / 1e12:.2f} TB/s "
                  f"{t * bw / nbytes:.2f}x floor  diff {err:.1e}{'  MISMATCH' if err > 1e-2 else ''}", flush=True)
        except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
            rows.append(dict(cfg=cfg, error=f"{type(e).__name__}: {str(e)[:120]}"))
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return rows


def sweep_short(bw, ctx=4096):
    """Batch 1, short context: the split floor (min_chunk), attention kernels in a CUDA graph."""
    q, cache, tables, lens, w = make_batch(1, ctx)
    q_lat, q_pe = absorbed_query(q, w)
    rows = []
    for cfg in (dict(), dict(min_chunk=128), dict(min_chunk=256), dict(min_chunk=512), dict(legacy=True)):
        t = graph_time(lambda: mla_decode_attention(q_lat, q_pe, cache, tables, lens, SCALE, {}, **cfg))
        rows.append(dict(ctx=ctx, cfg=cfg or "default", graph_us=t * 1e6, over_floor=t * bw / (ctx * BYTES_PER_TOKEN)))
        print(f"  ctx={ctx} {str(cfg or 'default'):30s} attn graph {t * 1e6:6.1f}us", flush=True)
    return rows


def prefill_rows(cases):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kimi_linear.ops.mla.naive import gather_latent, mla_attention_mha
    from kimi_linear.ops.mla.prefill import mla_prefill

    rows = []
    for T, ctx in cases:
        L = ctx + T
        nbps = triton.cdiv(L, BS)
        cache = torch.randn(nbps, BS, R + DR, device=DEVICE, dtype=torch.bfloat16)
        tables = torch.randperm(nbps, device=DEVICE).view(1, nbps).to(torch.int32)
        q = torch.randn(T, H, DN + DR, device=DEVICE, dtype=torch.bfloat16)
        w = (torch.randn(H * (DN + DV), R, device=DEVICE) / R ** 0.5).to(torch.bfloat16)
        lat_all = gather_latent(cache, tables[0], L)
        latent = lat_all[ctx:].contiguous()
        fn = lambda: mla_prefill(q, latent, cache, tables, [T], [ctx], w, DV, SCALE)  # noqa: E731
        out = fn()
        sl = slice(T - 64, T)  # the last 64 queries against the fp32 reference
        ref = mla_attention_mha(q[sl].float(), lat_all[:, :R].float(), lat_all[:, R:].float(), w.float(), DV, SCALE)
        err = ((out[sl].float() - ref).norm() / ref.norm()).item()
        t = bench(fn)
        flops = 2 * H * T * (ctx + (T + 1) / 2) * (DN + DR + DV)
        row = dict(T=T, context=ctx, rel_err=err, ours_ms=t * 1e3, ours_TFLOPs=flops / t / 1e12)
        if ctx == 0:
            kv = (latent[:, :R] @ w.t()).view(T, H, DN + DV)
            k = torch.cat([kv[..., :DN], latent[:, None, R:].expand(T, H, DR)], -1).transpose(0, 1)[None]
            v = F.pad(kv[..., DN:], (0, DN + DR - DV)).transpose(0, 1)[None]
            qq = q.transpose(0, 1)[None]
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ts = bench(lambda: F.scaled_dot_product_attention(qq, k, v, is_causal=True, scale=SCALE))
            row.update(sdpa_flash_padded_ms=ts * 1e3, sdpa_TFLOPs=flops / ts / 1e12)
        rows.append(row)
        print(f"  T={T} ctx={ctx} err={err:.1e} ours={t * 1e3:.2f} ms ({row['ours_TFLOPs']:.0f} TFLOP/s)"
              + (f" sdpa-flash(padded V, K/V given)={row['sdpa_flash_padded_ms']:.2f} ms" if ctx == 0 else ""),
              flush=True)
        del cache, q, w, lat_all, latent, out
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small contexts only")
    ap.add_argument("--prefill", action="store_true", help="also time the prefill kernel")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "mla_decode.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{dev}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    if args.quick:
        shapes = [(1, 4096), (8, 4096), (1, 131072)]
    else:
        shapes = [(1, 4096), (1, 131072), (1, 1048576), (8, 4096), (8, 131072), (32, 4096), (32, 32768),
                  (64, 4096), (128, 4096), (256, 4096)]
    t0 = time.time()
    print("decode (default launch; before = legacy kernels):", flush=True)
    dec = decode_rows(shapes, bw)
    print("attention variants, batch 1:", flush=True)
    sw = sweep(bw, 131072 if args.quick else 1048576)
    short = sweep_short(bw)
    pre = []
    if args.prefill:
        print("prefill:", flush=True)
        pre = prefill_rows([(4096, 0), (4096, 28672), (16384, 0)] if not args.quick else [(1024, 0), (1024, 4096)])
    with open(args.json, "w") as f:
        json.dump(dict(device=dev, copy_TBps=bw / 1e12, decode=dec, sweep=sw, sweep_short=short, prefill=pre), f,
                  indent=1, default=str)

    print(f"\n## MLA decode, {dev}, bf16, H={H} R={R} Dr={DR}, block {BS}; copy bw {bw / 1e12:.2f} TB/s "
          f"({time.time() - t0:.0f}s)")
    print("| batch | context | splits | cache GB | rel err | attn us | before attn us | attn speedup | eager us "
          "| graph us | before graph us | floor us | attn TB/s | attn/floor | graph/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in dec:
        print(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['cache_GB']:.3f} | {r['rel_err']:.1e} "
              f"| {r['attn_us']:.1f} | {r['before_attn_us']:.1f} | {r['before_attn_us'] / r['attn_us']:.2f}x "
              f"| {r['eager_us']:.1f} | {r['graph_us']:.1f} | {r['before_graph_us']:.1f} | {r['floor_us']:.1f} "
              f"| {r['attn_TBps']:.2f} | {r['attn_over_floor']:.2f} | {r['graph_over_floor']:.2f} |")
    big = [r for r in dec if r["batch"] == 1 and r["context"] == max(s[1] for s in shapes)]
    if big:
        r = big[0]
        print(f"DEFAULT batch 1, {r['context']} tokens: attn {r['attn_us']:.1f} us = {r['attn_over_floor']:.2f}x floor "
              f"({r['attn_TBps']:.2f} TB/s), before {r['before_attn_us']:.1f} us; graph {r['graph_us']:.1f} us")
    print("| variant (batch 1) | us | TB/s | x floor | diff vs default |")
    print("|---|---|---|---|---|")
    for r in sw:
        if "us" in r:
            print(f"| {r['cfg']} | {r['us']:.1f} | {r['TBps']:.2f} | {r['over_floor']:.2f} | {r['diff_vs_default']:.1e} |")
        else:
            print(f"| {r['cfg']} | {r['error']} | | | |")
    for r in short:
        print(f"| 4K graph {r['cfg']} | {r['graph_us']:.1f} | | {r['over_floor']:.1f} | |")
    best = min((r for r in sw if "us" in r and r["diff_vs_default"] < 1e-2), key=lambda r: r["us"], default=None)
    if best:
        print(f"sweep best: {best['cfg']} {best['us']:.1f} us ({best['over_floor']:.2f}x floor)")


if __name__ == "__main__":
    main()
