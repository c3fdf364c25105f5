"""Decode token gaps under a concurrent long prefill (issue 16, item 8): mixed steps with the decode rows
on the decode kernels (`ForwardContext.row_runs`) vs the whole batch through the chunked path (before).

    python -m benchmarks.mixed_latency                 # tiny, CPU, fp32: 32 decodes at 1K context beside a 4K prompt
    python -m benchmarks.mixed_latency --smoke         # a few seconds (CI: tests/reliability/test_mixed_latency.py)

`--decodes` requests decode at a context of `--context` tokens (admitted with `LLMEngine.admit_computed`,
their latent blocks and KDA states filled with seeded random values as benchmarks/engine_decode.py does)
when a `--prompt`-token prompt arrives; the engine prefills it in chunks of `--max-num-batched-tokens`
minus the decodes, beside them, so every step until its first token is mixed. For each mode (split: the
default; chunked: `ForwardContext.split_decodes = False`, every row through chunk_kda and the MLA MHA
form, as before), on the same engine with the same caches and prompts: the decode gap (the time between
two tokens of a decoding request) over that window, p50 and max, and the long prompt's time to first
token. The floor, measured in the same run: a prefill-only step of one chunk (a mixed step computes that
chunk and more; a second engine of the same shape with a budget of one chunk runs it), printed beside a
decode-only step of the same requests. The greedy tokens of the decode requests
must be the same in both modes. Prints both modes beside the floor and chunked / split; writes JSON to
$OUT (or --json) if set. Prefix caching is off, so the two modes compute the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from kimi_linear import LLM, SamplingParams
from kimi_linear.tools.presets import preset_config

MODES = ("chunked", "split")


@torch.no_grad()
def fill_random(engine, req, seed: int) -> None:
    """Seeded random latent blocks and KDA states for the request (never zeros), as if prefilled."""
    cache = engine.runner.cache
    g = torch.Generator(device=cache.device).manual_seed(seed)
    blocks = torch.tensor(req.block_ids, dtype=torch.long, device=cache.device)
    for t in cache.paged_tensors():
        t[blocks] = torch.randn((len(blocks), *t.shape[1:]), generator=g, device=t.device).to(t.dtype)
    for s, ts in zip(cache.specs, cache.tensors):
        if s is None or s.paged:
            continue
        for st, t in zip(s.states, ts):
            std = 0.05 if st.name == "recurrent" else 1.0
            t[req.state_slot] = (torch.randn(t.shape[1:], generator=g, device=t.device) * std).to(t.dtype)


class Toggle:
    """Wraps the model's forward_flat: `split = False` runs mixed batches as one chunked run (the old path)."""

    def __init__(self, model):
        self.split = True
        self.forward_flat = model.forward_flat
        self.mixed_steps = 0
        model.forward_flat = self

    def __call__(self, input_ids, ctx):
        ctx.split_decodes = self.split
        if not ctx.is_decode and len({q == 1 for q in ctx.query_lens}) == 2:
            self.mixed_steps += 1
        return self.forward_flat(input_ids, ctx)


def decode_prompts(args, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (args.context,), generator=g).tolist() for _ in range(args.decodes)]


def admit_decodes(engine, tag: str, prompts, max_tokens: int) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = []
    for i, p in enumerate(prompts):
        req = engine.admit_computed(f"{tag}-d{i}", {"prompt_token_ids": p}, params, num_computed_tokens=len(p) - 1)
        fill_random(engine, req, seed=1000 + i)
        reqs.append(req)
    return reqs


def drain(engine, ids: list[str]) -> None:
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    s = engine.scheduler
    assert s.block_pool.num_free == s.block_pool.num_blocks and s.state_pool.num_free == s.state_pool.num_slots


def clocks() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine the CPU clock shows the work alone."""
    return time.perf_counter(), time.process_time()


def run_mode(engine, toggle: Toggle, mode: str, args, prompts, long_prompt, window_steps: int) -> dict:
    """Decode requests, then the long prompt arrives: every decode gap until its first token (both clocks)."""
    toggle.split = mode == "split"
    toggle.mixed_steps = 0
    reqs = admit_decodes(engine, mode, prompts, args.warmup + window_steps + 8)
    for _ in range(args.warmup):  # pure decode steps
        engine.step()
    window_start = reqs[0].num_output_tokens
    long_id = f"{mode}-long"
    t0 = clocks()
    last = {r.request_id: t0 for r in reqs}
    count = {r.request_id: r.num_output_tokens for r in reqs}
    gaps: list[tuple[float, float]] = []
    engine.add_request(long_id, {"prompt_token_ids": long_prompt},
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    ttft = None
    while ttft is None:
        outs = engine.step()
        now = clocks()
        for r in reqs:  # non-streamed requests report only when they finish: read their token counts
            if r.num_output_tokens > count[r.request_id]:
                gaps.append((now[0] - last[r.request_id][0], now[1] - last[r.request_id][1]))
                last[r.request_id], count[r.request_id] = now, r.num_output_tokens
        if any(o.request_id == long_id for o in outs):
            ttft = (now[0] - t0[0], now[1] - t0[1])
    tokens = [list(r.output_token_ids[window_start:]) for r in reqs]
    drain(engine, [r.request_id for r in reqs])
    wall, cpu = [g[0] * 1e3 for g in gaps], [g[1] * 1e3 for g in gaps]
    return {"gap_p50_ms": statistics.median(wall), "gap_max_ms": max(wall), "ttft_ms": ttft[0] * 1e3,
            "gap_p50_cpu_ms": statistics.median(cpu), "ttft_cpu_ms": ttft[1] * 1e3,
            "mixed_steps": toggle.mixed_steps, "num_gaps": len(gaps), "tokens": tokens,
            "async_scheduling": engine.async_scheduling}


def timed_step(engine) -> tuple[float, float]:
    a = clocks()
    engine.step()
    b = clocks()
    return (b[0] - a[0]) * 1e3, (b[1] - a[1]) * 1e3


def run_floor(engine, floor_engine, args, prompts, long_prompt) -> dict:
    """The floor of a mixed step: a prefill-only step of one chunk of the long prompt (`floor_engine`: the same
    shape with a budget of one chunk); beside it, a decode-only step of the decode requests."""
    reqs = admit_decodes(engine, "floor", prompts, args.warmup + 8)
    engine.step()  # warm
    decode = [timed_step(engine) for _ in range(args.warmup)]
    drain(engine, [r.request_id for r in reqs])
    floor_engine.add_request("floor-long", {"prompt_token_ids": long_prompt},
                             SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    prefill = []
    while floor_engine.has_unfinished_requests():
        prefill.append(timed_step(floor_engine))
    full = prefill[1:-1] or prefill  # not the first step (a cold engine) nor the last (a partial chunk)
    return {"decode_step_ms": statistics.median(d[0] for d in decode),
            "decode_step_cpu_ms": statistics.median(d[1] for d in decode),
            "prefill_chunk_ms": statistics.median(p[0] for p in full),
            "prefill_chunk_cpu_ms": statistics.median(p[1] for p in full)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--decodes", type=int, default=32, help="requests decoding when the long prompt arrives")
    ap.add_argument("--context", type=int, default=1024, help="their context length")
    ap.add_argument("--prompt", type=int, default=4096, help="the long prompt's length")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3, help="pure decode steps before the prompt arrives (>= 1)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (chunked, split), interleaved; medians reported")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: 8 decodes at 128 tokens beside a 256-token prompt")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.decodes, args.context, args.prompt, args.max_num_batched_tokens, args.warmup, args.rounds = \
            8, 128, 256, 72, 2, 1
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1")
    if args.max_num_batched_tokens <= args.decodes:
        raise SystemExit("--max-num-batched-tokens must exceed --decodes (the prompt needs room beside them)")
    threads = torch.get_num_threads()
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    chunk = args.max_num_batched_tokens - args.decodes
    window_steps = -(-args.prompt // chunk)
    base = preset_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(base, f)
        kw = dict(device=args.device, dtype=args.dtype, load_format="dummy", enable_prefix_caching=False,
                  max_model_len=max(args.context, args.prompt) + args.warmup + window_steps + 16,
                  max_num_seqs=args.decodes + 1, block_size=16)
        llm = LLM(tmp, max_num_batched_tokens=args.max_num_batched_tokens, **kw)
        floor_llm = LLM(tmp, max_num_batched_tokens=chunk, **kw)
        engine = llm.llm_engine
        toggle = Toggle(engine.runner.model)
        vocab = engine.vocab_size
        prompts = decode_prompts(args, vocab)
        long_prompt = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(2)).tolist()
        print(f"{args.preset} on {args.device} ({args.dtype}): {args.decodes} decodes at context {args.context}, "
              f"a {args.prompt}-token prompt in chunks of {chunk} ({window_steps} mixed steps)", flush=True)
        floors, runs = [], {m: [] for m in MODES}
        for i in range(args.rounds):
            floors.append(run_floor(engine, floor_llm.llm_engine, args, prompts, long_prompt))
            for m in MODES:
                runs[m].append(run_mode(engine, toggle, m, args, prompts, long_prompt, window_steps))
                r = runs[m][-1]
                print(f"  round {i}: {m:<8} decode gap p50 {r['gap_p50_ms']:8.1f} ms (CPU {r['gap_p50_cpu_ms']:8.1f})  "
                      f"max {r['gap_max_ms']:8.1f}  TTFT {r['ttft_ms']:8.1f} ms  ({r['mixed_steps']} mixed steps)",
                      flush=True)
        floor_llm.shutdown()
        llm.shutdown()
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["chunked"], runs["split"]))
    floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
    keys = ("gap_p50_ms", "gap_max_ms", "ttft_ms", "gap_p50_cpu_ms", "ttft_cpu_ms")
    summary = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in MODES}
    for m in MODES:
        summary[m]["mixed_steps"] = runs[m][0]["mixed_steps"]
    fl, flc = floor["prefill_chunk_ms"], floor["prefill_chunk_cpu_ms"]
    print(f"\nfloor: a prefill-only step of one chunk {fl:.1f} ms (CPU {flc:.1f}); a decode-only step of the "
          f"decodes {floor['decode_step_ms']:.1f} ms (CPU {floor['decode_step_cpu_ms']:.1f})")
    print("mode      gap p50 ms  (CPU ms)   gap max ms      TTFT ms  (CPU ms)   p50/floor  (CPU)")
    for m in MODES:
        s = summary[m]
        print(f"{m:<8} {s['gap_p50_ms']:>11.1f} {s['gap_p50_cpu_ms']:>9.1f} {s['gap_max_ms']:>12.1f} "
              f"{s['ttft_ms']:>12.1f} {s['ttft_cpu_ms']:>9.1f} {s['gap_p50_ms'] / fl:>10.2f}x "
              f"{s['gap_p50_cpu_ms'] / flc:>5.2f}x")
    ch, sp = summary["chunked"], summary["split"]
    ratios = {"gap_p50": ch["gap_p50_ms"] / sp["gap_p50_ms"],
              "gap_p50_cpu": ch["gap_p50_cpu_ms"] / sp["gap_p50_cpu_ms"],
              "ttft": ch["ttft_ms"] / sp["ttft_ms"]}
    print(f"chunked / split: decode gap p50 {ratios['gap_p50']:.2f}x (CPU {ratios['gap_p50_cpu']:.2f}x), "
          f"TTFT {ratios['ttft']:.2f}x; decode tokens equal in both modes: {same}")
    result = {"args": vars(args), "floor": floor, "modes": summary, "chunked_over_split": ratios,
              "tokens_equal": same, "rounds": {m: [{k: v for k, v in r.items() if k != "tokens"} for r in runs[m]]
                                               for m in MODES}}
    out = args.json or (os.path.join(os.environ["OUT"], "mixed_latency.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    if not same:
        raise SystemExit("the decode requests' tokens differ between the split and the chunked path")
    return result


if __name__ == "__main__":
    main()
