"""MLA decode (absorbed, split-KV over the paged latent cache): launch configurations vs the copy floor.

Real shape (H=32, Dn=128, Dr=64, Dv=128, R=512), bf16 (a variant naming `fp8` uses a float8_e4m3fn cache,
its floor counted in 1-byte values), scattered block tables, random cache contents.
Each launch configuration (`default`, or overrides of `mla_decode_attention`'s launch arguments such as
`bh16/s3`) runs in its own subprocess, so that a launch that faults (an illegal memory access poisons
the CUDA context) cannot take the others down. A configuration is first checked against the fp32
naive absorbed form (block sizes 16 / 64 / 256, padding rows, 200K and 1M tokens); only then timed
(median of `triton.testing.do_bench`, L2 flushed between calls):
  attn   the two Triton kernels (absorbed query given),
  graph  the whole `mla_decode` (W_UK bmm, kernels, W_UV bmm) replayed from a CUDA graph,
against floor = cache bytes / measured device copy bandwidth (read + write counted). The 4K graph is
also timed with a larger split floor (min_chunk). `compute-sanitizer` (when installed) is run on a
configuration whose check faults, to name the faulting access.

    python -m benchmarks.mla_decode [--quick] [--variants default,bh16,s3,...]

Options (see `parse_spec`) bisect a failure or a launch choice, e.g. `--variants default,w8,bn16/nopre`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import triton

from benchmarks.common import bench_ms, copy_bandwidth, graph_time_ms, rel_err
from kimi_linear.ops.mla.decode import decode_num_splits, mla_decode, mla_decode_attention
from kimi_linear.ops.mla.naive import naive_mla_decode

H, DN, DR, DV, R = 32, 128, 64, 128, 512
BS = 64
SCALE = (DN + DR) ** -0.5
DEVICE = "cuda"
DEFAULT_VARIANTS = "default,bh16,s3"  # ~1 min each
SHAPES = [(1, 4096), (1, 131072), (1, 1048576), (8, 4096), (8, 131072), (32, 32768), (128, 4096)]
QUICK_SHAPES = [(1, 4096), (8, 4096), (1, 131072)]
CHECK_TAIL = [1000, 0, 5000, 33000]  # after [1, 17, block size, block size + 1]; index 5 is a padding row
CHECK_LONG = (200_000, 1_048_576)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the variant subprocesses run from here


def parse_spec(spec: str) -> dict:
    """'default' or '/'-separated launch overrides -> keyword arguments of `mla_decode_attention`:
    bnN (tile tokens), wN (warps), sN (stages), mcN (min_chunk), spN (splits), bhN (heads per program),
    nopre (no block-id prefetch), dl / nodl (each latent tile loaded twice, once per dot, or once: the
    default is dl over an fp8 cache, nodl over bf16). E.g. 'bh16/s3' ->
    dict(block_h=16, num_stages=3). 'fp8' is not a launch option: it selects a float8_e4m3fn cache (see
    `cache_dtype`), e.g. 'fp8/dl'."""
    kw: dict = {}
    names = dict(bn="block_n", w="num_warps", s="num_stages", mc="min_chunk", sp="num_splits", bh="block_h")
    for opt in spec.split("/"):
        if opt == "default":
            continue
        if opt == "nopre":
            kw["prefetch"] = False
            continue
        if opt in ("dl", "nodl"):
            kw["dual_load"] = opt == "dl"
            continue
        if opt == "fp8":
            continue
        key = opt.rstrip("0123456789")
        if key not in names or key == opt:
            raise SystemExit(f"unknown launch option {opt!r} in {spec!r} (options: default, fp8, dl, nodl, nopre, "
                             + ", ".join(k + "N" for k in names) + ")")
        kw[names[key]] = int(opt[len(key):])
    return kw


def reference_decode(q, cache, tables, lens, w, Dv, scale):
    """The naive absorbed form in fp32 (the oracle)."""
    return naive_mla_decode(q.float(), cache.float(), tables, lens, w.float(), Dv, scale)


def cache_dtype(spec: str) -> torch.dtype:
    """The latent cache's dtype of a variant: float8_e4m3fn when its spec names 'fp8', else bf16."""
    return torch.float8_e4m3fn if "fp8" in spec.split("/") else torch.bfloat16


def make_batch(lens, bs: int = BS, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    need = [triton.cdiv(L, bs) for L in lens]
    NB = sum(need) + 1
    cache = torch.randn(NB, bs, R + DR, device=DEVICE, dtype=torch.bfloat16, generator=g).to(dtype)
    perm = torch.randperm(NB, device=DEVICE, generator=g).to(torch.int32)
    tables = torch.zeros(len(lens), max(max(need), 1), dtype=torch.int32, device=DEVICE)
    k = 0
    for n, nb in enumerate(need):
        tables[n, :nb] = perm[k:k + nb]
        k += nb
    q = torch.randn(len(lens), H, DN + DR, device=DEVICE, dtype=torch.bfloat16, generator=g)
    w = (torch.randn(H * (DN + DV), R, device=DEVICE, generator=g) / R ** 0.5).to(torch.bfloat16)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE), w


def worst_row_err(q, cache, tables, lens, w, out, rows) -> float:
    """The worst relative error of the given rows of `out` vs the fp32 reference."""
    return max(rel_err(reference_decode(q[n:n + 1], cache, tables[n:n + 1], lens[n:n + 1], w, DV, SCALE),
                       out[n:n + 1].float()) for n in rows)


def bench(fn) -> float:
    """Seconds per call (do_bench median)."""
    return bench_ms(fn) * 1e-3


def graph_time(fn) -> float:
    """Seconds per replay of fn captured in a CUDA graph."""
    return graph_time_ms(lambda i: fn()) * 1e-3


def check(kw, dtype=torch.bfloat16) -> float:
    """Worst relative error vs the fp32 reference over block sizes, padding rows and long contexts."""
    worst = 0.0
    for bs in (16, 64, 256):
        lens = [1, 17, bs, bs + 1] + CHECK_TAIL
        q, cache, tables, lens_t, w = make_batch(lens, bs, seed=bs, dtype=dtype)
        out = mla_decode(q, cache, tables, lens_t, w, DV, SCALE, {}, **kw)
        torch.cuda.synchronize()
        worst = max(worst, worst_row_err(q, cache, tables, lens_t, w, out, [n for n, L in enumerate(lens) if L]))
        if torch.count_nonzero(out[5]).item():
            raise AssertionError("padding row not zero")
    for L in CHECK_LONG:
        q, cache, tables, lens_t, w = make_batch([L], BS, seed=L % 997, dtype=dtype)
        out = mla_decode(q, cache, tables, lens_t, w, DV, SCALE, {}, **kw)
        torch.cuda.synchronize()
        worst = max(worst, worst_row_err(q, cache, tables, lens_t, w, out, [0]))
        del q, cache, tables, lens_t, w, out
        torch.cuda.empty_cache()
    return worst


def time_variant(kw, shapes, bw, dtype=torch.bfloat16) -> dict:
    rows = []
    for N, ctx in shapes:
        q, cache, tables, lens, w = make_batch([ctx] * N, dtype=dtype)
        extras = {}
        wv = w.view(H, DN + DV, R)
        q_lat, q_pe = torch.bmm(q[..., :DN].transpose(0, 1), wv[:, :DN]), q[..., DN:]
        t_attn = bench(lambda: mla_decode_attention(q_lat, q_pe, cache, tables, lens, SCALE, extras, **kw))
        t_graph = graph_time(lambda: mla_decode(q, cache, tables, lens, w, DV, SCALE, extras, **kw))
        floor = N * ctx * (R + DR) * cache.element_size() / bw
        rows.append(dict(batch=N, context=ctx, attn_us=t_attn * 1e6, graph_us=t_graph * 1e6, floor_us=floor * 1e6,
                         attn_over_floor=t_attn / floor))
        print(f"  N={N:4d} ctx={ctx:8d} attn={t_attn * 1e6:9.1f}us graph={t_graph * 1e6:9.1f}us "
              f"floor={floor * 1e6:8.1f}us ({t_attn / floor:.2f}x)", flush=True)
        del q, cache, tables, lens, w, extras, q_lat, q_pe
        torch.cuda.empty_cache()
    q, cache, tables, lens, w = make_batch([4096], dtype=dtype)
    short = {}
    for mc in (64, 256):
        kw_mc = dict(kw, min_chunk=mc)
        short[str(mc)] = graph_time(lambda: mla_decode(q, cache, tables, lens, w, DV, SCALE, {}, **kw_mc)) * 1e6
        print(f"  4K graph min_chunk={mc}: {short[str(mc)]:.1f}us", flush=True)
    return dict(rows=rows, graph_4k_min_chunk=short)


def run_one(spec: str, shapes, bw: float) -> None:
    kw = parse_spec(spec)
    t0 = time.time()
    dtype = cache_dtype(spec)
    err = check(kw, dtype)
    print(f"  [{spec}] check: worst rel err {err:.1e} ({time.time() - t0:.0f}s)", flush=True)
    res = dict(spec=spec, rel_err=err, splits_batch1=decode_num_splits(1, H, torch.device(DEVICE),
                                                                       kw.get("block_h", 32)))
    if err < 2e-2:
        res.update(time_variant(kw, shapes, bw, dtype))
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small contexts only")
    ap.add_argument("--shapes", default=None, help="batch x context list, e.g. 1x4096,1x1048576 (default: all)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--one", default=None, help="(internal) run one variant in this process")
    ap.add_argument("--bw", type=float, default=0.0, help="(internal) copy bandwidth, bytes/s")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per variant subprocess")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "mla_decode.json"))
    args = ap.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
    if args.one:
        run_one(args.one, shapes, args.bw)
        return
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth(1 << 31)
    print(f"{dev}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    torch.cuda.empty_cache()
    results = []
    for spec in args.variants.split(","):
        print(f"variant {spec}:", flush=True)
        cmd = [sys.executable, "-m", "benchmarks.mla_decode", "--one", spec, "--bw", str(bw)] \
            + (["--quick"] if args.quick else []) + (["--shapes", args.shapes] if args.shapes else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            out = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            out += f"\nTIMEOUT after {args.timeout}s"
        res = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
        for line in out.splitlines():
            if line.startswith("  "):
                print(line, flush=True)
        if res is None:
            tail = "\n".join(out.strip().splitlines()[-6:])
            print(f"  [{spec}] FAILED:\n{tail}", flush=True)
            res = dict(spec=spec, error=tail[-600:])
            sanitizer = shutil.which("compute-sanitizer") or (
                "/usr/local/cuda/bin/compute-sanitizer" if os.path.exists("/usr/local/cuda/bin/compute-sanitizer")
                else None)
            if sanitizer and "illegal memory access" in out:
                code = (f"import torch; from benchmarks import mla_decode as B; "
                        f"kw = B.parse_spec({spec!r}); "
                        f"q, c, t, l, w = B.make_batch([300, 70], 64); "
                        f"B.mla_decode(q, c, t, l, w, B.DV, B.SCALE, {{}}, **kw); torch.cuda.synchronize()")
                try:
                    s = subprocess.run([sanitizer, "--tool", "memcheck", "--print-limit", "3", sys.executable, "-c",
                                        code], capture_output=True, text=True, timeout=120, cwd=ROOT)
                    res["sanitizer"] = "\n".join((s.stdout + s.stderr).splitlines()[:40])
                    print(res["sanitizer"], flush=True)
                except subprocess.TimeoutExpired:
                    print("  compute-sanitizer timed out", flush=True)
        results.append(res)
    with open(args.json, "w") as f:
        json.dump(dict(device=dev, copy_TBps=bw / 1e12, variants=results), f, indent=1)

    print(f"\n## MLA decode attention, {dev}, bf16 queries (cache: fp8 where the launch names it), H={H} R={R} "
          f"Dr={DR}, block {BS}; copy bw {bw / 1e12:.2f} TB/s")
    head = ["launch", "rel err"] + [f"N={n} {c // 1024}K attn us (x floor)" for n, c in shapes] + [
        "4K graph us", "4K graph mc256 us"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        if "rows" not in r:
            print(f"| {r['spec']} | {r.get('rel_err', 'FAILED')} |" + " |" * (len(head) - 2))
            continue
        cells = [f"{x['attn_us']:.1f} ({x['attn_over_floor']:.2f}x)" for x in r["rows"]]
        g = r["graph_4k_min_chunk"]
        print(f"| {r['spec']} | {r['rel_err']:.1e} | " + " | ".join(cells) + f" | {g['64']:.1f} | {g['256']:.1f} |")
    ok = [r for r in results if "rows" in r]
    if ok:
        key = max(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1] if shapes[i][0] == 1 else 0)
        best = min(ok, key=lambda r: r["rows"][key]["attn_us"])
        dflt = next((r for r in ok if r["spec"] == "default"), None)
        print(f"BEST at batch 1 / {shapes[key][1]} tokens: {best['spec']} {best['rows'][key]['attn_us']:.1f} us "
              f"({best['rows'][key]['attn_over_floor']:.2f}x floor)")
        if dflt:
            r = dflt["rows"][key]
            print(f"DEFAULT: {r['attn_us']:.1f} us ({r['attn_over_floor']:.2f}x floor)")


if __name__ == "__main__":
    main()
