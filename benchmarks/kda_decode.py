"""KDA decode-step benchmark: our fused recurrent kernel vs fla-core 0.6.0 vs the copy-bandwidth floor.

One decode step = one token for each of B sequences, bf16 q/k/v/f/beta logits, gate + beta sigmoid +
q/k L2 norm in the kernel, fp32 states [32, 128, 128] read from and written back to a state pool in
place (the engine's layout: B = 1 varlen batch with cu_seqlens and state_indices).

- Ours: timed inside a CUDA graph holding R consecutive steps (median replay by do_bench, per step).
  When the B states fit in L2, successive steps use different pool slots (rotation), so every step
  reads its state from HBM as it does in the model.
- fla: `fla.ops.kda.fused_recurrent.fused_recurrent_kda_fwd` with `ssm_state_indices` and
  `inplace_final_state=True` (the same work: the pool path vLLM uses), timed the same way if it
  captures, else with do_bench; plus fla's public `fused_recurrent_kda` (new final-state tensor) with
  do_bench outside a graph, the figure in performance.md.
- floor: the state bytes read + written / device-to-device copy bandwidth measured in the same run.
- Numerics: ours (and fla) against the fp32 naive op in the same run.

`python -m benchmarks.kda_decode [--json PATH]` prints the table, a (BV, num_warps) sweep and the conv
decode-step timings (C = 12288) at B in {1, 256}.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from benchmarks.common import bench_ms, copy_bandwidth, graph_time_ms, import_fla, rel_err
from kimi_linear.ops.conv import causal_conv1d, naive_causal_conv1d
from kimi_linear.ops.kda import fused_recurrent_kda, naive_recurrent_kda
from kimi_linear.ops.kda.fused_recurrent import decode_config

DEVICE = "cuda"
SWEEP = [(8, 1), (8, 2), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]
GATE = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)


def graph_time_us(step, n_steps: int) -> float:
    """Per-step time (us) of `step(i)` for i < n_steps, captured in one CUDA graph and replayed."""
    return graph_time_ms(step, n_steps) * 1e3


def bench_us(fn) -> float:
    return bench_ms(fn, warmup=25, rep=200) * 1e3


def rotation_sets(state_bytes: int) -> int:
    """How many disjoint slot sets so that successive steps' states together exceed 3x the L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(64, math.ceil(3 * l2 / state_bytes)))


def _inputs(B, H, K, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)

    q, k, v, f = (rnd(1, B, H, K) for _ in range(4))
    beta = rnd(1, B, H)
    A_log = torch.empty(H, device=DEVICE).uniform_(1, 16, generator=g).log()
    dt_bias = rnd(H * K, dtype=torch.float32) * 0.5 - 4.0
    cu = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
    return q, k, v, f, beta, A_log, dt_bias, cu


def _fla_fwd():
    """fla's pool-path decode kernel and its public API, or (None, None)."""
    fused, public = import_fla("fla.ops.kda.fused_recurrent"), import_fla("fla.ops.kda")
    if fused is None or public is None:
        return None, None
    return fused.fused_recurrent_kda_fwd, public.fused_recurrent_kda


def _time_fla(row, fla_fwd, fla_public, q, k, v, f, beta, A_log, dt_bias, cu, pool, idx, out, kw, n_steps, check):
    """fla's pool path (same inputs, same in-place pool) in a CUDA graph if it captures, else do_bench;
    and fla's public API eagerly (do_bench)."""
    B, H, K = q.shape[1], q.shape[2], q.shape[3]
    sets = len(idx)
    fla_out = torch.empty_like(out)

    def fla(i):
        fla_fwd(q=q, k=k, v=v, g=f, beta=beta, A_log=A_log, dt_bias=dt_bias, initial_state=pool,
                inplace_final_state=True, cu_seqlens=cu, ssm_state_indices=idx[i % sets],
                use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                out=fla_out)

    if check:
        saved = pool[:B].clone()
        ref_pool = saved.clone()
        o_ref, _ = naive_recurrent_kda(q.float(), k.float(), v.float(), f.float(), beta.float(),
                                       initial_state=ref_pool, state_indices=idx[0], **kw)
        fla(0)
        row["fla_err_o"] = rel_err(o_ref, fla_out)
        pool[:B].copy_(saved)
    try:
        row["fla_us"], row["fla_method"] = graph_time_us(fla, n_steps), "cuda-graph"
    except Exception as e:  # capture failed: time it eagerly
        print(f"fla capture failed at B={B}: {e!r}")
        row["fla_us"], row["fla_method"] = bench_us(lambda: fla(0)), "do_bench"
    h0 = pool[:B]
    row["fla_eager_us"] = bench_us(lambda: fla_public(
        q.view(B, 1, H, K), k.view(B, 1, H, K), v.view(B, 1, H, K), f.view(B, 1, H, K),
        beta.view(B, 1, H), A_log=A_log, dt_bias=dt_bias, initial_state=h0, output_final_state=True,
        **GATE))


def run_decode_benchmark(batch_sizes=(1, 16, 64, 256), H=32, K=128, check=True, sweep=False) -> list[dict]:
    """Rows with B, ours_us, fla_us, floor_us, ratio_vs_fla (fla / ours), frac_copy_bw (floor / ours),
    plus fla_method, fla_eager_us, config, errors, and with `sweep` the best (BV, num_warps)."""
    bw = copy_bandwidth()
    fla_fwd, fla_public = _fla_fwd()
    rows = []
    for B in batch_sizes:
        q, k, v, f, beta, A_log, dt_bias, cu = _inputs(B, H, K, seed=B)
        state_bytes = B * H * K * K * 4
        sets = rotation_sets(state_bytes)
        pool = torch.randn(sets * B, H, K, K, device=DEVICE) * 0.1
        idx = [torch.arange(B, dtype=torch.int32, device=DEVICE) + i * B for i in range(sets)]
        out = torch.empty(1, B, H, K, dtype=torch.bfloat16, device=DEVICE)
        kw = dict(GATE, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu)
        n_steps = max(sets, 16)
        row = dict(B=B, config=decode_config(B * H, v.shape[-1], q.device), rotation_sets=sets,
                   steps_per_graph=n_steps)

        if check:
            ref_pool, mine = pool[:B].clone(), pool[:B].clone()
            o_ref, _ = naive_recurrent_kda(q.float(), k.float(), v.float(), f.float(), beta.float(),
                                           initial_state=ref_pool, state_indices=idx[0], **kw)
            o, _ = fused_recurrent_kda(q, k, v, f, beta, initial_state=mine, state_indices=idx[0], **kw)
            row["err_o"], row["err_state"] = rel_err(o_ref, o), rel_err(ref_pool, mine)
            assert row["err_o"] <= 1e-2 and row["err_state"] <= 1e-2, f"B={B}: numerics {row}"

        def ours(i, **cfg):
            fused_recurrent_kda(q, k, v, f, beta, initial_state=pool, state_indices=idx[i % sets], out=out,
                                **kw, **cfg)

        row["ours_us"] = graph_time_us(ours, n_steps)
        if sweep:
            times = {}
            for bv, nw in SWEEP:
                times[(bv, nw)] = graph_time_us(lambda i: ours(i, block_v=bv, num_warps=nw), n_steps)
            best = min(times, key=times.get)
            row["sweep_us"] = {f"{bv}x{nw}": round(t, 2) for (bv, nw), t in times.items()}
            row["best_config"], row["best_us"] = best, times[best]

        row["fla_us"] = row["fla_eager_us"] = float("nan")
        row["fla_method"] = "unavailable"
        if fla_fwd is not None:
            try:
                _time_fla(row, fla_fwd, fla_public, q, k, v, f, beta, A_log, dt_bias, cu, pool, idx, out, kw,
                          n_steps, check)
            except Exception as e:  # keep our figures even if the peer breaks
                print(f"fla failed at B={B}: {e!r}")
                row["fla_method"] = f"failed: {type(e).__name__}"

        row["floor_us"] = 2 * state_bytes / bw * 1e6
        row["ratio_vs_fla"] = row["fla_us"] / row["ours_us"]
        row["frac_copy_bw"] = row["floor_us"] / row["ours_us"]
        row["copy_bw_TBs"] = bw / 1e12
        rows.append(row)
        print(f"B={B}: ours {row['ours_us']:.2f} us, fla {row['fla_us']:.2f} us ({row['fla_method']}), "
              f"floor {row['floor_us']:.2f} us, errors o {row.get('err_o')} state {row.get('err_state')}", flush=True)
        del pool
        torch.cuda.empty_cache()
    return rows


def run_conv_decode_benchmark(batch_sizes=(1, 256), C=12288, W=4, check=True) -> list[dict]:
    """The conv decode update (one token per sequence, bf16 state pool in place) inside a CUDA graph."""
    bw = copy_bandwidth(1 << 28)  # bytes/s
    rows = []
    for B in batch_sizes:
        g = torch.Generator(device=DEVICE).manual_seed(B)
        w = torch.randn(C, W, generator=g, device=DEVICE).bfloat16()
        x = torch.randn(B, C, generator=g, device=DEVICE).bfloat16()
        state_bytes = B * (W - 1) * C * 2
        sets = rotation_sets(state_bytes)
        pool = torch.randn(sets * B, W - 1, C, generator=g, device=DEVICE).bfloat16()
        idx = [torch.arange(B, dtype=torch.int32, device=DEVICE) + i * B for i in range(sets)]
        cu = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
        row = dict(B=B, C=C, W=W, rotation_sets=sets)
        if check:
            ref_pool, mine = pool.clone(), pool.clone()
            y_ref = naive_causal_conv1d(x, w, ref_pool, cu, idx[0])
            y = causal_conv1d(x, w, mine, cu, idx[0])
            row["err_y"] = rel_err(y_ref, y)
            assert row["err_y"] <= 1e-2 and torch.equal(ref_pool, mine), f"conv B={B}: numerics {row}"
        row["us"] = graph_time_us(lambda i: causal_conv1d(x, w, pool, cu, idx[i % sets]), max(sets, 16))
        moved = 2 * B * C * 2 + 2 * state_bytes  # x in, y out, window in and out
        row["floor_us"] = moved / bw * 1e6
        row["frac_copy_bw"] = row["floor_us"] / row["us"]
        rows.append(row)
    return rows


def _fmt(x, nd=1):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    rows = run_decode_benchmark(sweep=not args.no_sweep)
    conv = []
    try:  # the KDA table survives a conv failure
        conv = run_conv_decode_benchmark()
    except Exception as e:
        print(f"conv decode benchmark failed: {e!r}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(kda_decode=rows, conv_decode=conv), fh, indent=1, default=str)
    if not args.no_sweep:
        print("\nsweep (BV x num_warps -> us per step, in a CUDA graph):")
        for r in rows:
            print(f"  B={r['B']:4d}: best {r['best_config']} {r['best_us']:.2f} us | {r['sweep_us']}")
    print("\nconv decode update (C=12288, W=4, bf16, in a CUDA graph):")
    for r in conv:
        print(f"  B={r['B']:4d}: {r['us']:.2f} us, floor {r['floor_us']:.2f} us, "
              f"{100 * r['frac_copy_bw']:.0f}% of copy bw, err {r.get('err_y', float('nan')):.1e}")
    print(f"\nKDA decode step, H=32 K=V=128, copy bw {rows[0]['copy_bw_TBs']:.2f} TB/s "
          f"(ours: CUDA graph; fla: {rows[0]['fla_method']}; fla_eager: public API, do_bench)")
    print(f"{'B':>5} {'cfg':>8} {'ours_us':>8} {'fla_us':>8} {'fla_eager':>9} {'floor_us':>8} "
          f"{'vs_fla':>7} {'copy_bw':>8} {'err_o':>8} {'err_S':>8}")
    for r in rows:
        print(f"{r['B']:>5} {str(r['config']):>8} {_fmt(r['ours_us'], 2):>8} {_fmt(r['fla_us'], 2):>8} "
              f"{_fmt(r['fla_eager_us']):>9} {_fmt(r['floor_us'], 2):>8} {_fmt(r['ratio_vs_fla'], 2):>6}x "
              f"{100 * r['frac_copy_bw']:>7.1f}% {r.get('err_o', float('nan')):>8.1e} "
              f"{r.get('err_state', float('nan')):>8.1e}")


if __name__ == "__main__":
    main()
