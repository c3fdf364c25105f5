"""KDA chunk kernels (prefill / training) vs fla-core 0.6.0 vs the physical floor, then the decode step.

Real shape: H=32, K=V=128, bf16, gate (-exp(A_log) softplus(f + dt_bias)), beta sigmoid and q/k L2 norm
computed in the kernel, random inputs (A_log = log U(1, 16)), (B, T) in {(16, 4096), (4, 16384),
(1, 65536)}; output_final_state=True, no initial state, same options for both.
  check   ours vs the fp32 naive reference on a slice (B=2, T=1000; a varlen batch; a varlen batch with the
          released checkpoint's gate magnitudes, exp(A_log) up to 201, chunk decay sums below -6e4):
          output, final state and every gradient,
  ours    forward (no grad) and forward+backward (median of triton.testing.do_bench), and the forward again
          with the released checkpoint's gate magnitudes (`real_gate`: "ckpt-gate" in the table; the forward's
          diagonal blocks take their exact path where a block's decay span is too large for the anchored one),
  fla     fla.ops.kda.chunk_kda, same inputs and options (both gate settings); one untimed forward+backward
          per shape first
          runs its autotuning to completion (FLA_CACHE_RESULTS keeps the choices in TRITON_CACHE_DIR),
  floor   max(FLOPs / matmul rate, bytes / copy bandwidth), both measured in this run. FLOPs: the
          report's Eq. 13, 6 T d^2 + 3 T C d + T C^2 per head (x3 for forward+backward); bytes: q, k, v,
          g, beta in and o out (forward); plus do in and dq, dk, dv, dg, dbeta out, and q, k, v, g, beta
          read again (forward+backward),
then a per-kernel breakdown (torch.profiler), an optional sweep of launch settings (chunk_kda's
`config` argument, per-kernel times from the profiler), and the decode benchmark of
benchmarks/kda_decode.py (--skip-decode to skip).

One table at the end holds every ratio (forward and forward+backward vs fla and vs the floor; the decode
step vs fla and as a fraction of copy bandwidth).

    python -m benchmarks.kda [--skip-decode] [--sweep-seconds 60] [--decode-sweep]   (JSON to $OUT if set)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import torch

from benchmarks.common import T0, bench_ms, copy_bandwidth, import_fla, log, matmul_rate, rel_err
from kimi_linear.ops.kda import chunk as chunk_mod
from kimi_linear.ops.kda import naive_chunk_kda
from kimi_linear.ops.kda.chunk import chunk_kda

H, D, C = 32, 128, 64
SHAPES = [(16, 4096), (4, 16384), (1, 65536)]
OPTS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
BENCH = dict(warmup=5, rep=40)  # few repetitions: one forward+backward at 1 x 65536 takes ~70 ms


def floors_ms(B, T, bw, rate) -> tuple[float, float]:
    flops = B * H * (6 * T * D * D + 3 * T * C * D + T * C * C)
    tok = B * T * H
    fwd_bytes = (5 * D + 1) * tok * 2  # q, k, v, g, o (+ beta)
    bwd_bytes = fwd_bytes + (5 * D + 1) * tok * 2 + (5 * D + 1) * tok * 2  # + do, dq, dk, dv, dg, dbeta; re-read
    return (max(flops / rate, fwd_bytes / bw) * 1e3, max(3 * flops / rate, bwd_bytes / bw) * 1e3)


def make_inputs(B, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, generator=g).to(bf)
    k = torch.randn(B, T, H, D, device=dev, generator=g).to(bf)
    v = torch.randn(B, T, H, D, device=dev, generator=g).to(bf)
    f = torch.randn(B, T, H, D, device=dev, generator=g).to(bf)
    beta = torch.randn(B, T, H, device=dev, generator=g).to(bf)
    A_log = torch.empty(H, device=dev).uniform_(1, 16, generator=g).log()
    dt_bias = torch.empty(H * D, device=dev).uniform_(math.log(1e-3), math.log(0.1), generator=g).exp()
    dt_bias = dt_bias + torch.log(-torch.expm1(-dt_bias))
    return q, k, v, f, beta, A_log, dt_bias


def real_gate(inputs, seed=0):
    """The released checkpoint's gate magnitudes on the same q, k, v, beta: exp(A_log) from 201 down to 1
    over the heads, raw gates with a per-channel offset in [-8, 14] plus noise (per-token log decays
    below -2.7e3, sums over one chunk below -6e4)."""
    q, k, v, f, beta, A_log, dt_bias = inputs
    g = torch.Generator(device="cuda").manual_seed(seed)
    offset = torch.empty(H, D, device="cuda").uniform_(-8.0, 14.0, generator=g)
    f = (offset + 2.0 * torch.randn(f.shape, device="cuda", generator=g)).to(f.dtype)
    A_log = torch.linspace(math.log(201.0), 0.0, H, device="cuda")
    return q, k, v, f, beta, A_log, dt_bias


def fwd_bwd(fn, inputs, cu=None, h0=None, seed=1):
    q, k, v, f, beta, A_log, dt_bias = inputs
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, f, beta, A_log, dt_bias)]
    h = h0.detach().clone().requires_grad_(True) if h0 is not None else None
    o, s = fn(*leaves[:5], A_log=leaves[5], dt_bias=leaves[6], initial_state=h, output_final_state=True,
              cu_seqlens=cu, **OPTS)
    g = torch.Generator(device="cuda").manual_seed(seed)
    do = torch.randn(o.shape, device="cuda", generator=g)
    ds = torch.randn(s.shape, device="cuda", generator=g)
    ((o.float() * do).sum() + (s.float() * ds).sum()).backward()
    out = dict(o=o, final_state=s, dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad, df=leaves[3].grad,
               dbeta=leaves[4].grad, dA_log=leaves[5].grad, ddt_bias=leaves[6].grad)
    if h is not None:
        out["dh0"] = h.grad
    return out


def check(fla=None, ours: bool = True) -> dict:
    """Relative errors vs the fp32 reference: ours (unless `ours` is False) and fla's when given."""
    res = {}
    lens = [1, 63, 64, 65, 1000]
    for name, B, T, lens in (("B2_T1000", 2, 1000, None), ("varlen", 1, sum(lens), lens),
                             ("real_gate", 1, sum(lens), lens)):
        inputs = make_inputs(B, T, seed=3)
        if name == "real_gate":
            inputs = real_gate(inputs)
        cu = None
        N = B
        if lens is not None:
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
            N = len(lens)
        h0 = torch.randn(N, H, D, D, device="cuda")
        ref = fwd_bwd(naive_chunk_kda, [x.float() if x.is_floating_point() else x for x in inputs], cu, h0)
        if ours:
            mine = fwd_bwd(chunk_kda, inputs, cu, h0)
            res[f"ours_{name}"] = {key: rel_err(ref[key], mine[key]) for key in ref}
            bad = [key for key in mine if not torch.isfinite(mine[key]).all()]
            if bad:
                res[f"ours_{name}"]["non_finite"] = bad
        if fla is not None:
            try:
                theirs = fwd_bwd(fla, inputs, None if cu is None else cu.long(), h0)
                res[f"fla_{name}"] = {key: rel_err(ref[key], theirs[key]) for key in ref if theirs.get(key) is not None}
            except Exception as e:
                res[f"fla_{name}"] = {"error": repr(e)}
        del ref
        torch.cuda.empty_cache()
    return res


def fla_warm(fn, B, T) -> None:
    """One forward (no grad) and one forward+backward of `fn` at (B, T), untimed (autotuning, compiles)."""
    q, k, v, f, beta, A_log, dt_bias = make_inputs(B, T)
    with torch.no_grad():
        fn(q, k, v, f, beta, A_log=A_log, dt_bias=dt_bias, output_final_state=True, **OPTS)
    leaves = [x.requires_grad_(True) for x in (q, k, v, f, beta, A_log, dt_bias)]
    o, _ = fn(*leaves[:5], A_log=leaves[5], dt_bias=leaves[6], output_final_state=True, **OPTS)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()


def time_op(fn, B, T, backward: bool, real: bool = False) -> float:
    """Median ms of one forward (no grad) or one forward+backward of `fn` (ours or fla's) at (B, T); `real`:
    with the released checkpoint's gate magnitudes (`real_gate`) instead of the benchmark's."""
    inputs = make_inputs(B, T)
    q, k, v, f, beta, A_log, dt_bias = real_gate(inputs) if real else inputs
    if not backward:
        with torch.no_grad():
            return bench_ms(lambda: fn(q, k, v, f, beta, A_log=A_log, dt_bias=dt_bias, output_final_state=True,
                                       **OPTS), **BENCH)
    leaves = [x.requires_grad_(True) for x in (q, k, v, f, beta, A_log, dt_bias)]
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

    def step():
        o, _ = fn(*leaves[:5], A_log=leaves[5], dt_bias=leaves[6], output_final_state=True, **OPTS)
        o.backward(do)

    return bench_ms(step, grad_to_none=leaves, **BENCH)


def kernel_breakdown(B, T, config: dict | None = None, backward: bool = True, n: int = 3) -> dict:
    """Per-kernel CUDA time (ms per call) of our forward+backward (or inference forward), from torch.profiler;
    `config` overrides chunk_kda's launch settings."""
    q, k, v, f, beta, A_log, dt_bias = make_inputs(B, T)
    leaves = [x.requires_grad_(backward) for x in (q, k, v, f, beta, A_log, dt_bias)]
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

    def step():
        for x in leaves:  # no gradient accumulation kernels in the profile
            x.grad = None
        with torch.set_grad_enabled(backward):
            o, _ = chunk_kda(*leaves[:5], A_log=leaves[5], dt_bias=leaves[6], output_final_state=True,
                             config=config, **OPTS)
        if backward:
            o.backward(do)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out[e.key[:60]] = t / n / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# chunk_kda's launch-setting groups (chunk.CONFIG keys) -> the Triton kernels they launch
KERNELS = {"intra": ("fwd_prep", "fwd_diag", "fwd_solve"), "scan": ("fwd_scan",), "bwd_scan": ("bwd_scan",),
           "bwd_state": ("bwd_state",), "bwd_intra": ("bwd_intra", "bwd_gate")}
FORWARD = ("intra", "scan")  # timed in the inference forward (their training variants save more)


def kernel_ms(B, T, kernel: str, config: dict | None = None) -> float:
    """CUDA time (ms per call) of the kernels of launch group `kernel` under `config`."""
    times = kernel_breakdown(B, T, config, backward=kernel not in FORWARD)
    ms = sum(t for name, t in times.items() if any(part in name for part in KERNELS[kernel]))
    if ms == 0:
        raise RuntimeError(f"no {KERNELS[kernel]} kernel in the profile: {sorted(times)}")
    return ms


SCAN_CFGS = [dict(BV=64, num_warps=4, num_stages=3), dict(BV=64, num_warps=8, num_stages=3),
             dict(BV=32, num_warps=4, num_stages=3)]
BWD_SCAN_CFGS = [dict(BV=32, num_warps=4, num_stages=2), dict(BV=64, num_warps=8, num_stages=2)]
INTRA_CFGS = [dict(diag_warps=2), dict(diag_warps=4)]
BWD_INTRA_CFGS = [dict(num_warps=w) for w in (4, 8)]


def kernel_sweep(seconds: float) -> dict:
    """Time each kernel group under several launch settings (chunk_kda's `config`, per-kernel times from
    the profiler) at 1 x 65536; returns {shape: {kernel: (best cfg, ms)}} and the raw rows."""
    t_end = time.time() + seconds
    plan = [((1, 65536), [("bwd_intra", BWD_INTRA_CFGS), ("intra", INTRA_CFGS), ("scan", SCAN_CFGS),
                          ("bwd_scan", BWD_SCAN_CFGS)])]
    best, rows = {}, []
    for (B, T), items in plan:
        shape = f"{B}x{T}"
        for kernel, cfgs in items:
            for cfg in cfgs:
                if time.time() > t_end:
                    break
                try:
                    ms = kernel_ms(B, T, kernel, {kernel: cfg})
                except Exception as e:
                    rows.append(dict(B=B, T=T, kernel=kernel, cfg=cfg, error=repr(e)[:200]))
                    continue
                rows.append(dict(B=B, T=T, kernel=kernel, cfg=cfg, ms=ms))
                cur = best.setdefault(shape, {}).get(kernel)
                if cur is None or ms < cur[1]:
                    best[shape][kernel] = (cfg, ms)
            if kernel in best.get(shape, {}):
                log(f"sweep {shape} {kernel}: " + ", ".join(
                    f"{r['cfg']}={r['ms']:.3f}" for r in rows if r.get('ms') and r['kernel'] == kernel and r['B'] == B))
        torch.cuda.empty_cache()
    return dict(best=best, rows=rows)


def apply_best(best: dict, B: int, T: int) -> dict:
    """Launch-setting overrides (chunk_kda's `config`) for a shape: per kernel, the best swept setting of
    the shape itself, else of the nearest swept shape (not for the scans: their settings depend on it)."""
    cfg = {}
    for key in [f"{B}x{T}", "4x16384", "1x65536", "16x4096"]:
        for kernel, (c, _) in best.get(key, {}).items():
            if kernel in ("scan", "bwd_scan") and key != f"{B}x{T}":
                continue
            cfg.setdefault(kernel, dict(c))
    return cfg


def decode_rows(skip: bool, sweep: bool) -> list[dict]:
    if skip:
        return []
    from benchmarks.kda_decode import run_decode_benchmark

    return run_decode_benchmark(batch_sizes=(1, 16, 64, 256), H=32, K=128, check=True, sweep=sweep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--fla-check", action="store_true", help="also check fla's numerics (autotunes it at more shapes)")
    ap.add_argument("--sweep-seconds", type=float, default=0.0)
    ap.add_argument("--decode-sweep", action="store_true", help="also time the decode step's launch settings")
    ap.add_argument("--shapes", default=None, help="e.g. 16x4096,1x65536")
    ap.add_argument("--fla-deadline", type=float, default=1e9, help="skip fla timings after this many seconds")
    ap.add_argument("--decode-deadline", type=float, default=1e9, help="skip decode after this many seconds")
    args = ap.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    log(f"device: {torch.cuda.get_device_name()}")
    result = dict(device=torch.cuda.get_device_name(), shapes=[], config=chunk_mod.CONFIG)
    out_dir = os.environ.get("OUT")

    def dump():
        if out_dir:
            with open(os.path.join(out_dir, "kda_bench.json"), "w") as fh:
                json.dump(result, fh, indent=1, default=str)

    bw, rate = copy_bandwidth(), matmul_rate()
    result.update(copy_bw_TBs=bw / 1e12, matmul_TFLOPs=rate / 1e12)
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    try:
        result["check"] = check()
        for key, errs in result["check"].items():
            log(f"check {key}: " + ", ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in errs.items()))
    except Exception as e:
        log(f"check failed: {e!r}")
    dump()
    best = {}
    if args.sweep_seconds > 0:
        try:
            result["sweep"] = kernel_sweep(args.sweep_seconds)
            best = result["sweep"]["best"]
            log(f"best: {best}")
        except Exception as e:
            log(f"sweep failed: {e!r}")
        torch.cuda.empty_cache()
        dump()
    for B, T in shapes:
        row = dict(B=B, T=T)
        cfg = apply_best(best, B, T)
        row["config"] = cfg
        row["floor_fwd_ms"], row["floor_fwd_bwd_ms"] = floors_ms(B, T, bw, rate)
        ours = functools.partial(chunk_kda, config=cfg)
        try:
            row["ours_fwd_ms"], row["ours_fwd_bwd_ms"] = time_op(ours, B, T, False), time_op(ours, B, T, True)
            row["ours_fwd_real_ms"] = time_op(ours, B, T, False, real=True)
        except Exception as e:
            log(f"ours failed at B={B} T={T}: {e!r}"[:400])
            row["ours_fwd_ms"] = row["ours_fwd_bwd_ms"] = float("nan")
            continue
        log(f"ours B={B} T={T}: fwd {row['ours_fwd_ms']:.3f} ms, fwd+bwd {row['ours_fwd_bwd_ms']:.3f} ms, "
            f"fwd with the checkpoint's gates {row['ours_fwd_real_ms']:.3f} ms  {cfg}")
        try:
            result.setdefault("breakdown", {})[f"{B}x{T}"] = kernel_breakdown(B, T, cfg)
            log("  kernels (ms/call): " + ", ".join(f"{k}={v:.3f}" for k, v in result["breakdown"][f"{B}x{T}"].items()))
        except Exception as e:
            log(f"breakdown failed: {e!r}")
        torch.cuda.empty_cache()
        result["shapes"].append(row)
        dump()
    fla_kda = None if args.skip_fla else import_fla("fla.ops.kda")
    fla = None if fla_kda is None else fla_kda.chunk_kda
    if fla is not None and args.fla_check:
        try:  # fla's numerics on the same slices (informational; its autotuning at these shapes costs minutes)
            result["check_fla"] = check(fla, ours=False)
            for key, errs in result["check_fla"].items():
                log(f"check {key}: " + ", ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in errs.items()))
        except Exception as e:
            log(f"fla check failed: {e!r}"[:300])
    if fla is not None:
        for row in result["shapes"]:
            t = time.time()
            try:  # untimed: fla's autotuning, to completion
                fla_warm(fla, row["B"], row["T"])
                log(f"fla B={row['B']} T={row['T']}: autotuned forward+backward in {time.time() - t:.1f} s")
            except Exception as e:
                log(f"fla warm-up failed at B={row['B']} T={row['T']}: {e!r}"[:300])
            torch.cuda.empty_cache()
        for mode in ("fwd", "fwd_bwd", "fwd_real"):
            for row in result["shapes"]:
                if time.time() - T0 > args.fla_deadline:
                    log("fla: out of time")
                    break
                try:
                    row[f"fla_{mode}_ms"] = time_op(fla, row["B"], row["T"], mode == "fwd_bwd", real=mode == "fwd_real")
                    log(f"fla B={row['B']} T={row['T']}: {mode} {row[f'fla_{mode}_ms']:.3f} ms")
                except Exception as e:
                    log(f"fla failed at B={row['B']} T={row['T']} {mode}: {e!r}"[:300])
                torch.cuda.empty_cache()
                dump()
    result["decode"] = []
    if time.time() - T0 < args.decode_deadline:
        try:
            result["decode"] = decode_rows(args.skip_decode, args.decode_sweep)
        except Exception as e:
            log(f"decode benchmark failed: {e!r}")
    dump()

    print_table(result, bw, rate)


def print_table(result: dict, bw: float, rate: float) -> None:
    """Every ratio in one table: chunk forward and forward+backward per shape, then the decode step."""
    nan = float("nan")
    print(f"\nKDA, H=32 K=V=128 bf16, gate + beta sigmoid + L2 norm in kernel; {result['device']}, "
          f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    print(f"{'case':<22} {'ours':>9} {'fla':>9} {'fla/ours':>8} {'floor':>8} {'floor/ours':>10}")
    for r in result["shapes"]:
        for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd"), ("fwd_real", "fwd ckpt-gate")):
            ours, fla = r.get(f"ours_{mode}_ms", nan), r.get(f"fla_{mode}_ms", nan)
            floor = r[f"floor_{mode.replace('_real', '')}_ms"]
            print(f"{label + ' ' + str(r['B']) + 'x' + str(r['T']) + ' ms':<22} {ours:>9.3f} {fla:>9.3f} "
                  f"{fla / ours:>8.2f} {floor:>8.3f} {floor / ours:>10.3f}")
    for r in result.get("decode", []):
        fla = r.get("fla_us") or nan
        print(f"{'decode B=' + str(r['B']) + ' us':<22} {r['ours_us']:>9.2f} {fla:>9.2f} {fla / r['ours_us']:>8.2f} "
              f"{r['floor_us']:>8.2f} {r['frac_copy_bw']:>10.3f}")
    print("(fla/ours > 1: we are faster; floor/ours: fraction of the floor reached, for the decode step the "
          "fraction of copy bandwidth)")


if __name__ == "__main__":
    main()
