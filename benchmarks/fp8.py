"""FP8 on the 256-expert shape: batch-1 TPOT with FP8 weights (and the FP8 latent cache) beside their
floors and beside bf16, measured in the same run; FP8 vs bf16 logit agreement on the dummy model.

    python -m benchmarks.fp8                         # 48b-a3b, contexts 4K,1M, CUDA (one H200: ~6 min)
    python -m benchmarks.fp8 --preset tiny --contexts 64,256 --steps 4 --device cpu --skip-bf16   # smoke test

Engines, one after the other (each freed before the next; the machinery is engine_decode.py's:
`run_variant` builds the engine from config.json with load_format="dummy", `run_context` reaches each
context through the engine's own cache structures and times `engine.step()` with CUDA events, `step_bytes`
counts the bytes a step must move in the parameters' own dtypes):
1. "fp8": `quantization="fp8"` over the dummy weights (drawn as for bf16 from the same seed, quantized per
   output channel tensor by tensor: the bf16 model is never allocated), `gpu_memory_utilization` set so the
   engine's budget is `--budget-gib` (79 GiB: what an 80 GB card offers) - weights, activations, graphs and a
   cache of at least max(contexts) tokens all inside it;
2. "bf16": the same shape in bf16 (98 GB: H200 only), unless --skip-bf16;
3. "fp8-kv8": engine 1 with `kv_cache_dtype="fp8"` (float8_e4m3fn latent cache, half the bytes).
Logits of a fixed prompt set (random ids, seeded) come from the fp8 and bf16 engines' models (`model(ids)`,
no cache); reported: greedy agreement, mean KL(bf16 || fp8) and the relative logit error of FP8 vs bf16.
The floor is bytes / copy bandwidth measured in the same run (benchmarks/common.py). First, the decode GEMMs
of the shape alone (M = 1: bf16 cuBLAS vs the FP8 path, the decode MoE bf16 vs FP8) as fractions of that
bandwidth, a guide for the kernels' tuning.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth, write_report
from benchmarks.engine_decode import Timer, parse_count, run_variant
from kimi_linear.ops.quant.fallback import fallbacks
from kimi_linear.tools.presets import preset_config

GiB = 1024 ** 3


def engine_info(engine, prompts: torch.Tensor | None) -> dict:
    """Weight bytes, cache layout and capacity, memory in use, and the logits of `prompts` (kept on the CPU;
    a cache-less forward, so the latent cache dtype plays no part in them)."""
    runner = engine.runner
    model = runner.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    logits = None
    if prompts is not None:
        with torch.no_grad():
            logits = model(prompts.to(runner.device)).cpu().float()
    used = torch.cuda.memory_reserved(runner.device) if runner.device.type == "cuda" else 0
    return {"weight_bytes": weights, "kv_cache_dtype": str(runner.kv_cache_dtype).removeprefix("torch."),
            "latent_bytes_per_token": sum(s.bytes_per_token for s in runner.cache.specs if s is not None and s.paged),
            "token_capacity": runner.sizing.token_capacity, "reserved_bytes": used, "logits": logits}


def decode_gemms(base: dict, bandwidth: float, device="cuda", bench=None) -> list[dict]:
    """Batch-1 decode GEMMs of the shape, bf16 F.linear (cuBLAS) vs the FP8 path (`ops.quant.fp8_linear`), and the
    decode MoE (k routed + the shared expert) bf16 vs FP8: ms each and the fraction of the copy bandwidth their
    weight bytes reach (CUDA only; a guide for the kernels' tuning)."""
    from benchmarks.common import bench_ms
    from kimi_linear.ops.moe.fused_moe import fused_moe

    bench_ms = bench or bench_ms
    from kimi_linear.ops.quant import fp8_linear, quantize_fp8

    D, H, K = base["hidden_size"], base["linear_attn_config"]["num_heads"], base["linear_attn_config"]["head_dim"]
    Hm = base["num_attention_heads"]
    mla_in = Hm * (base["qk_nope_head_dim"] + base["qk_rope_head_dim"]) + base["kv_lora_rank"] + base["qk_rope_head_dim"]
    shapes = {"kda in": (3 * H * K + 2 * K + H, D), "mla in": (mla_in, D), "o_proj": (D, H * K),
              "dense gate_up": (2 * base["intermediate_size"], D), "dense down": (D, base["intermediate_size"])}
    rows = []
    x = torch.randn(1, D, device=device, dtype=torch.bfloat16)
    for name, (N, Kd) in shapes.items():
        w = torch.randn(N, Kd, device=device, dtype=torch.bfloat16) / Kd ** 0.5
        q, sc = quantize_fp8(w)
        xi = torch.randn(1, Kd, device=device, dtype=torch.bfloat16)
        t_bf = bench_ms(lambda: torch.nn.functional.linear(xi, w))
        t_f8 = bench_ms(lambda: fp8_linear(xi, q, sc))
        rows.append({"gemm": name, "N": N, "K": Kd, "bf16_ms": t_bf, "fp8_ms": t_f8,
                     "bf16_bw_frac": 2 * N * Kd / (t_bf * 1e-3) / bandwidth, "fp8_bw_frac": N * Kd / (t_f8 * 1e-3) / bandwidth})
    E, I, k = base["num_experts"] + 1, base["moe_intermediate_size"], base["num_experts_per_token"] + 1
    w13 = torch.randn(E, 2 * I, D, device=device, dtype=torch.bfloat16) / D ** 0.5
    w2 = torch.randn(E, D, I, device=device, dtype=torch.bfloat16) / I ** 0.5
    q13, s13 = zip(*(quantize_fp8(w13[e]) for e in range(E)))
    q2, s2 = zip(*(quantize_fp8(w2[e]) for e in range(E)))
    q13, s13, q2, s2 = torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)
    ids = torch.cat([torch.randperm(E - 1, device=device)[:k - 1], torch.tensor([E - 1], device=device)])[None]
    tw = torch.rand(1, k, device=device)
    t_bf = bench_ms(lambda: fused_moe(x, w13, w2, tw, ids, reduce=False))
    t_f8 = bench_ms(lambda: fused_moe(x, q13, q2, tw, ids, reduce=False, w13_scale=s13, w2_scale=s2))
    nbytes = k * 3 * I * D
    rows.append({"gemm": f"moe decode ({k} experts)", "N": 3 * I, "K": D, "bf16_ms": t_bf, "fp8_ms": t_f8,
                 "bf16_bw_frac": 2 * nbytes / (t_bf * 1e-3) / bandwidth, "fp8_bw_frac": nbytes / (t_f8 * 1e-3) / bandwidth})
    del w13, w2, q13, q2
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    print("decode GEMM (M=1)         bf16 ms  (of copy BW)   fp8 ms  (of copy BW)   bf16 / fp8")
    for r in rows:
        print(f"{r['gemm']:<24} {r['bf16_ms']:>8.4f}  ({r['bf16_bw_frac']:>5.0%})  {r['fp8_ms']:>8.4f}  "
              f"({r['fp8_bw_frac']:>5.0%})   {r['bf16_ms'] / r['fp8_ms']:.2f}x", flush=True)
    return rows


def agreement(ref: torch.Tensor, got: torch.Tensor) -> dict:
    return {"greedy_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "mean_kl": F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                reduction="none").sum(-1).mean().item(),
            "logit_rel_err": ((got - ref).norm() / ref.norm()).item()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="48b-a3b", help="model shape preset (default 48b-a3b: 256 experts)")
    ap.add_argument("--contexts", default="4K,1M", help="comma-separated contexts, K/M suffixes allowed")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=79.0,
                    help="memory budget of the FP8 engines (gpu_memory_utilization = budget / device memory)")
    ap.add_argument("--bf16-utilization", type=float, default=0.92)
    ap.add_argument("--skip-bf16", action="store_true", help="no bf16 engine (GPUs without room for 98 GB)")
    ap.add_argument("--skip-gemms", action="store_true", help="no per-GEMM decode timings before the engines")
    ap.add_argument("--prompts", default="4x64", help="logit-agreement prompt set: BATCHxLENGTH random ids")
    ap.add_argument("--device", default=None)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    contexts = [parse_count(c) for c in args.contexts.split(",") if c.strip()]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = preset_config(args.preset)
    B, T = (int(v) for v in args.prompts.lower().split("x"))
    prompts = torch.randint(0, base["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1234))
    timer = Timer(device)
    bandwidth = copy_bandwidth(1 << 30 if device.type == "cuda" else 1 << 26, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else 0
    util = min(0.95, args.budget_gib * GiB / total) if total else 0.9
    print(f"device {gpu} ({total / GiB:.1f} GiB); copy bandwidth {bandwidth / 1e12:.3f} TB/s; FP8 engines at "
          f"gpu_memory_utilization {util:.3f} = {util * total / GiB:.1f} GiB", flush=True)
    gemms = decode_gemms(base, bandwidth) if device.type == "cuda" and not args.skip_gemms else []
    common = argparse.Namespace(device=str(device), dtype="bfloat16", steps=args.steps, warmup=args.warmup,
                                max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=util,
                                enforce_eager=False, block_size=args.block_size, contexts=contexts)
    runs = [("fp8", {"quantization": "fp8"}, util)]  # most telling first: a timeout keeps what was printed
    if not args.skip_bf16:
        runs.append(("bf16", {}, args.bf16_utilization))
    runs.append(("fp8-kv8", {"quantization": "fp8", "kv_cache_dtype": "fp8"}, util))
    rows, info = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw, u in runs:
            a = copy.copy(common)
            a.gpu_memory_utilization = u

            def on_engine(engine, label=label):
                info[label] = engine_info(engine, None if label == "fp8-kv8" else prompts)
                i = info[label]
                print(f"[{label}] weights {i['weight_bytes'] / 1e9:.2f} GB, latent cache {i['kv_cache_dtype']} "
                      f"{i['latent_bytes_per_token']} B/token, capacity {i['token_capacity']} tokens, "
                      f"reserved {i['reserved_bytes'] / GiB:.1f} GiB", flush=True)
                if label == "bf16" and "fp8" in info:
                    a = agreement(i["logits"], info["fp8"]["logits"])
                    print(f"logits fp8 vs bf16 ({B}x{T} prompt positions): greedy agreement "
                          f"{a['greedy_agreement']:.3f}, mean KL {a['mean_kl']:.4f}, relative error "
                          f"{a['logit_rel_err']:.4f}", flush=True)
                return None

            rows += run_variant(base, "hybrid", a, timer, bandwidth, tmp, label=label, engine_kwargs=kw,
                                on_engine=on_engine)
            print(f"[{label}] done at {time.perf_counter() - t0:.0f} s", flush=True)

    by = {(r["variant"], r["context"]): r for r in rows}
    print("\nengine   context   TPOT ms  floor ms  TPOT/floor  step GB  graph-vs-eager")
    for r in rows:
        e = f"{r['graph_vs_eager_rel_err']:.1e}" if r["graph_vs_eager_rel_err"] is not None else "-"
        print(f"{r['variant']:<8} {r['context']:>8} {r['tpot_ms']:>9.3f} {r['floor_ms']:>9.3f} "
              f"{r['tpot_over_floor']:>10.2f}x {r['bytes']['total'] / 1e9:>8.2f}  {e}")
    ratios = []
    for ctx in contexts:
        f8, kv8, bf = by.get(("fp8", ctx)), by.get(("fp8-kv8", ctx)), by.get(("bf16", ctx))
        q = {"context": ctx}
        if bf:
            q["bf16_over_fp8_tpot"] = bf["tpot_ms"] / f8["tpot_ms"]
            q["bf16_over_fp8_floor"] = bf["floor_ms"] / f8["floor_ms"]
        q["fp8_over_fp8kv8_tpot"] = f8["tpot_ms"] / kv8["tpot_ms"]
        q["latent_bytes_fp8kv8_over_fp8"] = kv8["bytes"]["latent"] / f8["bytes"]["latent"]
        ratios.append(q)
        msg = f"context {ctx:>8}: FP8 TPOT {f8['tpot_ms']:.3f} ms = {f8['tpot_over_floor']:.2f}x its floor"
        if bf:
            msg += f"; bf16 / FP8 TPOT {q['bf16_over_fp8_tpot']:.2f}x (floors {q['bf16_over_fp8_floor']:.2f}x)"
        msg += (f"; FP8 latent cache: {kv8['bytes']['latent'] / 1e9:.2f} GB/step "
                f"({q['latent_bytes_fp8kv8_over_fp8']:.2f}x), TPOT {kv8['tpot_ms']:.3f} ms "
                f"({q['fp8_over_fp8kv8_tpot']:.2f}x faster)")
        print(msg)
    report = {"device": gpu, "copy_bandwidth_Bps": bandwidth, "preset": args.preset, "fp8_utilization": util,
              "results": rows, "ratios": ratios, "decode_gemms": gemms,
              "engines": {k: {kk: vv for kk, vv in v.items() if kk != "logits"} for k, v in info.items()}}
    for k, v in report["engines"].items():
        print(f"[{k}] weights {v['weight_bytes'] / 1e9:.2f} GB; capacity {v['token_capacity']} tokens; "
              f"latent {v['latent_bytes_per_token']} B/token")
    if "bf16" in info:
        report["fp8_vs_bf16_logits"] = a = agreement(info["bf16"]["logits"], info["fp8"]["logits"])
        print(f"logits fp8 vs bf16 ({B}x{T} prompt positions): greedy agreement {a['greedy_agreement']:.3f}, "
              f"mean KL {a['mean_kl']:.4f}, relative error {a['logit_rel_err']:.4f}")
    report["fallbacks"] = fallbacks()
    print(f"FP8 fast paths that fell back: {report['fallbacks'] or 'none'}")
    write_report(report, "fp8.json", args.json)
    return report


if __name__ == "__main__":
    main()
