"""`kimi-linear bench latency | throughput`: offline benchmarks like `vllm bench latency|throughput`.

latency: one batch of `--batch-size` random prompts of `--input-len` tokens, `--output-len` tokens
each (ignore_eos), repeated `--num-iters` times after warm-up; prints the mean and percentiles.
throughput: `--num-prompts` random requests submitted at once; prints requests/s and tokens/s. With
`--random-range-ratio r` each request's input and output lengths are drawn uniformly from [len * (1 - r),
len * (1 + r)] (vLLM's random dataset; `bench_datasets.random_requests`, the one `bench serve` uses), e.g. the
peers' "200 random prompts of 8000 in / 1500 out": `--num-prompts 200 --input-len 8000 --output-len 1500`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from kimi_linear.cli.engine_args import add_engine_args


def add_parsers(bench_sub: argparse._SubParsersAction) -> None:
    lat = bench_sub.add_parser("latency", help="offline latency of one batch")
    add_engine_args(lat)
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--num-iters-warmup", type=int, default=2)
    lat.add_argument("--num-iters", type=int, default=10)
    lat.add_argument("--output-json", default=None)
    lat.set_defaults(func=run_latency)
    thr = bench_sub.add_parser("throughput", help="offline throughput of many requests")
    add_engine_args(thr)
    thr.add_argument("--input-len", type=int, default=128)
    thr.add_argument("--output-len", type=int, default=128)
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--random-range-ratio", type=float, default=0.0,
                     help="draw each request's input and output lengths uniformly in [len * (1 - r), len * (1 + r)]")
    thr.add_argument("--output-json", default=None)
    thr.set_defaults(func=run_throughput)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(length)]} for _ in range(n)]


def _llm(args):
    from kimi_linear.cli.generate_cmd import make_llm

    return make_llm(args)


def run_latency(args: argparse.Namespace) -> int:
    from kimi_linear.sampling_params import SamplingParams

    llm = _llm(args)
    vocab = llm.llm_engine.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    prompts = _prompts(args.batch_size, args.input_len, vocab, args.seed)
    for _ in range(args.num_iters_warmup):
        llm.generate(prompts, params, use_tqdm=False)
    lat = []
    for _ in range(args.num_iters):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        lat.append(time.perf_counter() - t)
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))]  # noqa: E731
    print(f"Avg latency: {statistics.fmean(lat):.4f} seconds")
    for p in (10, 25, 50, 75, 90, 99):
        print(f"{p}% percentile latency: {pct(p):.4f} seconds")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"avg_latency": statistics.fmean(lat), "latencies": lat}, f, indent=2)
    llm.shutdown()
    return 0


def run_throughput(args: argparse.Namespace) -> int:
    from kimi_linear.sampling_params import SamplingParams

    from kimi_linear.cli.bench_datasets import DatasetError, Vocab, random_requests

    if not 0 <= args.random_range_ratio < 1:  # before the model loads
        raise SystemExit(f"error: --random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    llm = _llm(args)
    vocab = Vocab(llm.llm_engine.vocab_size, frozenset({0}))  # id 0 left out, as in latency's prompts
    try:
        reqs = random_requests(vocab, args.num_prompts, args.input_len, args.output_len, args.random_range_ratio,
                               random.Random(args.seed), as_text=False)
    except DatasetError as e:
        llm.shutdown()
        raise SystemExit(f"error: {e}") from None
    prompts = [{"prompt_token_ids": r.prompt} for r in reqs]
    params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    print(f"Throughput: {len(outs) / dt:.2f} requests/s, {(n_in + n_out) / dt:.2f} total tokens/s, "
          f"{n_out / dt:.2f} output tokens/s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"elapsed_time": dt, "num_requests": len(outs), "total_num_tokens": n_in + n_out,
                       "requests_per_second": len(outs) / dt, "tokens_per_second": (n_in + n_out) / dt}, f, indent=2)
    llm.shutdown()
    return 0
