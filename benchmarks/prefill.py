"""Batch-1 prefill at long contexts (32K, 128K, 1M tokens): time to first token and MFU, the real shape.

    python -m benchmarks.prefill                              # 48b-a3b (256 experts), dummy bf16, CUDA graphs
    python -m benchmarks.prefill --max-num-batched-tokens 8192,16384,32768 --contexts 128K   # chunk sweep
    python -m benchmarks.prefill --preset tiny --contexts 256,512 --device cpu --dtype float32   # smoke test

For each prefill chunk size C (`--max-num-batched-tokens`, a list sweeps; each C its own engine) one engine
is built from config.json alone with random weights (`load_format="dummy"`), prefix caching off (every
prompt is computed in full; no snapshot pool), one sequence (`max_num_seqs=1`), `max_model_len` = the
largest context + 1, CUDA graphs as by default (they serve decode; prefill chunks run eagerly, as in the
engine). A warm-up request (`--warmup-context`, default 2.5 C capped by the largest context: the first
chunk over an empty cache, a full chunk over a cached context, a partial last chunk) compiles the kernels
first. Then per context N, `--repeat` times (median): one request of N random token ids (no tokenizer),
greedy, max_tokens=1, fed to `LLMEngine.add_request`; the engine's scheduler chunks the prompt into
ceil(N / C) steps. Prefill time = wall time from add_request to the step that returns the token (the step
reads the sampled token back, so the device work is done; torch.cuda.synchronize before and after). The
engine's counters must show N tokens computed in ceil(N / C) steps. Async scheduling is off here: with it
a `step()` call launches the next chunk before it returns, so the per-step clock would no longer time one
chunk (and one request's prefill has no host work worth hiding). CUDA events between the steps give
each chunk's time (JSON `chunk_ms`: the first includes add_request; later chunks attend over more
keys). Triton compiles are logged per context (a compile inside a timed run would show there).

FLOPs (`kimi_linear.train.metrics.forward_flops_parts`, the one owner of the formula, the training count
is 3x it): prefilling N tokens costs
    N x 2 x (active matmul parameters - lm_head)   every decoder weight matrix a token multiplies with:
                                                   attention projections (KDA and MLA, kv_b_proj once per
                                                   token), router, dense MLP, k of E routed experts + the
                                                   shared experts; the embedding is a lookup
  + 2 x vocab x hidden                             lm_head, for the last token only
  + per MLA layer  H x (Dqk + Dv) x N^2            QK^T and PV over the causal half:
                                                   2 H Dqk N^2 / 2 + 2 H Dv N^2 / 2
  + per KDA layer  N x (6 H K V + 6 H K W)         the delta rule's state read and update per token and
                                                   head (q S, k S, k v^T), plus the short conv over
                                                   q, k, v (H x K channels each, W taps)
Model FLOPs only: the chunked KDA form's intra-chunk work (report Eq. 13: +~30% of the KDA term, < 0.3%
of the total) and the MLA prefill's re-expansion of the cached latents through kv_b_proj at every chunk
(~N^2 / (2C) x 2 x R x H x (Dn + Dv) per MLA layer: ~2.5% more at 1M with C = 16K) are not counted.
For 48b-a3b (3.11B active matmul parameters, 0.38B of them lm_head; 7 MLA layers, H = 32, Dqk + Dv = 320;
20 KDA layers): 32K 0.258 PFLOP, 128K 1.955 PFLOP, 1M 84.6 PFLOP (93% of it MLA attention).
TFLOP/s = FLOPs / prefill time; MFU = TFLOP/s / the bf16 dense peak (`metrics.peak_flops`: 989 TFLOP/s on
an H100 / H200; '-' where unknown, e.g. the CPU) and / the matmul rate measured in the same run (an
8192^3 bf16 matmul, `benchmarks.common.matmul_rate`; on the CPU a `--matmul-n` product in the run's dtype).

Expected on an H200 (the MLA prefill kernel ran ~310-320 TFLOP/s, and the 128K prefill of this shape took
6.1 s with 8K chunks, ~320 TFLOP/s = 41% of a 780 TFLOP/s matmul): 32K ~0.8 s, 128K ~6 s, 1M ~270 s
(at 100% of 780 TFLOP/s: 0.33 / 2.5 / 108 s). Memory: 48b-a3b bf16 weights ~91.5 GiB, the 1M latent cache
of 7 MLA layers 7.9 GiB (8,064 bytes per token), the 16K-token profile a few GiB: ~104 GiB, 75% of the
H200's 139.8 GiB, so the default gpu_memory_utilization 0.9 holds 1M (the engine raises ConfigError naming
gpu_memory_utilization when one max_model_len sequence does not fit).

Prints a row per (chunk size, context): N, chunk, seconds, tokens/s, TFLOP/s, MFU vs peak and vs the
measured matmul rate; writes JSON to $OUT/prefill.json (and `--json`) after every context, so a run cut
short by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch

from benchmarks.common import CompileLog, add_shape_args, log, matmul_rate, shape_config, write_report
from benchmarks.engine_decode import parse_count
from kimi_linear import LLM, SamplingParams
from kimi_linear.train.metrics import forward_flops_parts, peak_flops

COMPILES = CompileLog()  # installed by main(): Triton compiles per context


def random_tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- one timed prefill
class StepClock:
    """Marks after each engine step: CUDA events (no sync until `ms()`), the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def ms(self) -> list[float]:
        """Milliseconds between successive marks (call after a sync)."""
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def prefill_once(engine, rid: str, prompt: list[int], device: torch.device) -> dict:
    """One request of `prompt` with max_tokens=1: seconds to its token, steps taken, each step's ms."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    before = engine.stats()
    clock = StepClock(device)
    sync(device)
    t0 = time.perf_counter()
    clock.mark()
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    final = None
    try:
        while final is None:
            outs = engine.step()
            clock.mark()
            final = next((o for o in outs if o.request_id == rid and o.finished), None)
    except Exception:  # e.g. out of memory: free the request's blocks and slot for the next context
        engine.abort_request(rid)
        engine.step()
        raise
    seconds = time.perf_counter() - t0
    sync(device)
    after = engine.stats()
    return {"seconds": seconds, "tokens_out": len(final.outputs[0].token_ids),
            "computed": after.num_scheduled_tokens - before.num_scheduled_tokens,
            "steps": after.num_steps - before.num_steps, "chunk_ms": clock.ms()}


def run_context(engine, N: int, chunk: int, args, device: torch.device, rates: dict, config) -> dict:
    vocab = engine.vocab_size
    COMPILES.take()
    runs = []
    for rep in range(args.repeat):
        r = prefill_once(engine, f"prefill{N}-{chunk}-{rep}", random_tokens(N, N + rep, vocab), device)
        want_steps = -(-N // chunk)
        if r["tokens_out"] != 1 or r["computed"] != N or r["steps"] != want_steps:
            raise RuntimeError(f"context {N}: expected 1 token from {N} computed tokens in {want_steps} steps, got "
                               f"{r['tokens_out']} from {r['computed']} in {r['steps']}")
        runs.append(r)
    s = engine.scheduler
    if s.block_pool.num_free != s.block_pool.num_blocks or s.state_pool.num_free != s.state_pool.num_slots:
        raise RuntimeError("the finished requests left blocks or state slots allocated")
    compiles = COMPILES.take()
    seconds = statistics.median(r["seconds"] for r in runs)
    flops = forward_flops_parts(config, N, num_logit_tokens=1)
    tflops = flops["total"] / seconds / 1e12
    row = {"context": N, "chunk": chunk, "chunks": runs[0]["steps"], "seconds": seconds,
           "seconds_all": [r["seconds"] for r in runs], "tokens_per_s": N / seconds,
           "flops": flops, "tflops": tflops,
           "mfu_peak": tflops * 1e12 / rates["peak"] if rates["peak"] else None,
           "mfu_matmul": tflops * 1e12 / rates["matmul"] if rates["matmul"] else None,
           "chunk_ms": runs[len(runs) // 2]["chunk_ms"], "compiles": len(compiles),
           "compile_s": sum(t for _, t in compiles)}
    c = row["chunk_ms"]
    log(f"[chunk {chunk}] context {N}: {seconds:.3f} s ({row['chunks']} chunks, first {c[0]:.1f} ms, last "
        f"{c[-1]:.1f} ms), {row['tokens_per_s']:.0f} tok/s, {flops['total'] / 1e15:.4g} PFLOP "
        f"(MLA attention {flops['mla_attention'] / flops['total']:.0%}) -> {tflops:.4g} TFLOP/s, "
        f"MFU {fmt_pct(row['mfu_peak'])} of peak, {fmt_pct(row['mfu_matmul'])} of matmul; "
        f"{CompileLog.summary(compiles)}")
    return row


# ---------------------------------------------------------------- one engine per chunk size
def build(folder: str, chunk: int, args) -> LLM:
    t0 = time.perf_counter()
    llm = LLM(folder, device=args.device, dtype=args.dtype, load_format="dummy",
              max_model_len=max(args.contexts) + 1, max_num_seqs=1, max_num_batched_tokens=chunk,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              block_size=args.block_size, enable_prefix_caching=False, async_scheduling=False)
    s = llm.llm_engine.stats()
    log(f"[chunk {chunk}] engine ready in {time.perf_counter() - t0:.1f} s: {s.num_blocks} blocks "
        f"({s.num_blocks * args.block_size} tokens), {s.num_slots} state slots")
    return llm


def release(llm, device: torch.device) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n^3 matmul: bf16 on CUDA (the ceiling of performance.md), the run's dtype on the CPU."""
    return matmul_rate(n, device, torch.bfloat16 if device.type == "cuda" else dtype)


# ---------------------------------------------------------------- report
def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def print_summary(report: dict) -> None:
    print("\n  context   chunk  chunks   prefill s     tok/s   TFLOP/s  MFU/peak  MFU/matmul")
    for r in report["rows"]:
        print(f"{r['context']:>9} {r['chunk']:>7} {r['chunks']:>7} {r['seconds']:>11.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['tflops']:>9.4g} {fmt_pct(r['mfu_peak']):>9} {fmt_pct(r['mfu_matmul']):>11}")
    peak, mm = report["peak_tflops"], report["matmul_tflops"]
    print(f"peak {'-' if peak is None else f'{peak:.0f}'} TFLOP/s (bf16 dense, spec); measured matmul "
          f"{mm:.4g} TFLOP/s ({report['matmul']})")
    for e in report["errors"]:
        print(f"error at chunk {e['chunk']} {e['part']}: {e['error']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap, "48b-a3b", "model shape preset (default 48b-a3b: 256 experts)")
    ap.add_argument("--contexts", default="32K,128K,1M", help="comma-separated prompt lengths, K/M suffixes allowed")
    ap.add_argument("--max-num-batched-tokens", default="16384",
                    help="prefill chunk sizes (the engine's token budget per step), comma-separated: one engine each")
    ap.add_argument("--repeat", type=int, default=1, help="timed prefills per context (the median is reported)")
    ap.add_argument("--warmup-context", type=int, default=None,
                    help="tokens of the warm-up prefill (default: 2.5 chunks, capped by the largest context)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--matmul-n", type=int, default=None, help="size of the timed n^3 matmul (default: 8192 on "
                                                                "CUDA, 512 on the CPU)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.contexts = [parse_count(c) for c in args.contexts.split(",") if c.strip()]
    chunks = [parse_count(c) for c in args.max_num_batched_tokens.split(",") if c.strip()]
    if not args.contexts or not chunks or min(args.contexts + chunks) < 1 or args.repeat < 1:
        raise SystemExit("--contexts, --max-num-batched-tokens and --repeat need positive values")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    dtype = getattr(torch, args.dtype)
    COMPILES.install()
    base = shape_config(args)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n = args.matmul_n or (8192 if device.type == "cuda" else 512)
    rates = {"peak": peak_flops(device), "matmul": measure_matmul(device, dtype, n)}
    matmul_desc = f"{n}^3 {'bfloat16' if device.type == 'cuda' else args.dtype}"
    peak_desc = "-" if rates["peak"] is None else f"{rates['peak'] / 1e12:.0f}"
    log(f"device {gpu}; preset {args.preset or args.model}; contexts {args.contexts}; chunks {chunks}; "
        f"matmul {matmul_desc} {rates['matmul'] / 1e12:.4g} TFLOP/s; peak {peak_desc} TFLOP/s")
    report = {"device": gpu, "preset": args.preset, "model": args.model, "dtype": args.dtype,
              "args": {k: v for k, v in vars(args).items() if k != "json"},
              "peak_tflops": rates["peak"] / 1e12 if rates["peak"] else None,
              "matmul_tflops": rates["matmul"] / 1e12, "matmul": matmul_desc, "rows": [], "errors": []}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(base, f)
        for chunk in chunks:
            try:
                llm = build(tmp, chunk, args)
            except Exception as e:  # keep the other chunk sizes' numbers
                report["errors"].append({"chunk": chunk, "part": "build", "error": repr(e)})
                log(f"[chunk {chunk}] engine failed to build: {e!r}")
                continue
            try:
                engine = llm.llm_engine
                config = engine.model_config
                warm = args.warmup_context or min(max(args.contexts), chunk * 5 // 2)
                t0 = time.perf_counter()
                try:
                    prefill_once(engine, f"warmup-{chunk}", random_tokens(warm, 1, engine.vocab_size), device)
                except Exception as e:
                    report["errors"].append({"chunk": chunk, "part": "warmup", "error": repr(e)})
                    log(f"[chunk {chunk}] warm-up failed: {e!r}")
                    continue
                log(f"[chunk {chunk}] warm-up prefill of {warm} tokens in {time.perf_counter() - t0:.1f} s: "
                    f"{CompileLog.summary(COMPILES.take())}")
                for N in args.contexts:
                    try:
                        report["rows"].append(run_context(engine, N, chunk, args, device, rates, config))
                    except Exception as e:
                        report["errors"].append({"chunk": chunk, "part": f"context {N}", "error": repr(e)})
                        log(f"[chunk {chunk}] context {N} failed: {e!r}")
                    write_report(report, "prefill.json", args.json)
            finally:
                release(llm, device)
    write_report(report, "prefill.json", args.json)
    print_summary(report)
    return report


if __name__ == "__main__":
    main()
