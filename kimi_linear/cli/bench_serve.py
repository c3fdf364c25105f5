"""`kimi-linear bench serve`: load-test an OpenAI-compatible server the way `vllm bench serve` does.

Sends `--num-prompts` streaming requests (random token-id prompts for /v1/completions, random words
for /v1/chat/completions) at `--request-rate` (Poisson, `inf` = all at once, optional burstiness)
under `--max-concurrency`, and reports, with vLLM's names: TTFT (send -> first streamed token), TPOT
((e2e - TTFT) / (output tokens - 1) per request), ITL (every gap between streamed chunks), E2EL, mean /
median / chosen percentiles, request and token throughput. Works against any OpenAI-compatible
server, ours or vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

_WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
          "or has had not but what all when there can one more about time other into could some them "
          "model token kernel state cache decode attention linear delta expert router latent").split()


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def add_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="load-test a running OpenAI-compatible server")
    p.add_argument("--backend", default="openai", choices=["openai", "openai-chat"],
                   help="openai = /v1/completions, openai-chat = /v1/chat/completions")
    p.add_argument("--base-url", default=None, help="server base URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="default /v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", default="random", choices=["random"])
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=32)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so outputs have fixed lengths")
    p.add_argument("--vocab-size", type=int, default=None, help="token-id range of random prompts (default: 255)")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.set_defaults(func=run)


def _lengths(n: int, mean: int, ratio: float, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


async def _one(client, url: str, body: dict, headers: dict, chat: bool, timeout: float) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                has_token = False
                for ch in chunk.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    if piece:
                        has_token = True
                if has_token:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens streamed"
    except Exception as e:  # network errors are results, not crashes
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _bench(args) -> dict:
    import httpx

    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    chat = args.backend == "openai-chat"
    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000)
    async with httpx.AsyncClient(limits=limits) as client:
        model = args.model
        if model is None:
            r = await client.get(base + "/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        vocab = args.vocab_size or 255
        in_lens = _lengths(args.num_prompts, args.random_input_len, args.random_range_ratio, rng)
        out_lens = _lengths(args.num_prompts, args.random_output_len, args.random_range_ratio, rng)
        bodies = []
        for il, ol in zip(in_lens, out_lens):
            body = {"model": model, "max_tokens": ol, "stream": True, "temperature": 0.0,
                    "stream_options": {"include_usage": True}}
            if args.ignore_eos:
                body["ignore_eos"] = True
            if chat:
                body["messages"] = [{"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(il))}]
            else:
                body["prompt"] = [rng.randrange(1, vocab) for _ in range(il)]
            bodies.append(body)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(body):
            if sem is None:
                return await _one(client, base + endpoint, body, headers, chat, args.timeout)
            async with sem:
                return await _one(client, base + endpoint, body, headers, chat, args.timeout)

        tasks = []
        start = time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if args.request_rate != float("inf"):
                theta = 1.0 / (args.request_rate * args.burstiness)
                await asyncio.sleep(rng.gammavariate(args.burstiness, theta))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args, model, in_lens)


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summarize(results: list[RequestResult], duration: float, args, model: str, in_lens: list[int]) -> dict:
    ok = [r for r in results if r.ok]
    out: dict = {"model": model, "backend": args.backend, "completed": len(ok), "failed": len(results) - len(ok),
                 "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
                 "duration": duration,
                 "total_input_tokens": sum(r.prompt_tokens or il for r, il in zip(results, in_lens) if r.ok),
                 "total_output_tokens": sum(r.output_tokens or (len(r.itls) + 1) for r in ok)}
    out["request_throughput"] = len(ok) / duration if duration else 0.0
    out["output_throughput"] = out["total_output_tokens"] / duration if duration else 0.0
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / duration \
        if duration else 0.0
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.e2e - r.ttft) / (n - 1) for r in ok if (n := (r.output_tokens or len(r.itls) + 1)) > 1],
        "itl": [x for r in ok for x in r.itls],
        "e2el": [r.e2e for r in ok],
    }
    pcts = [float(p) for p in args.metric_percentiles.split(",") if p]
    for name, xs in series.items():
        out[f"mean_{name}_ms"] = statistics.fmean(xs) * 1e3 if xs else 0.0
        out[f"median_{name}_ms"] = statistics.median(xs) * 1e3 if xs else 0.0
        out[f"std_{name}_ms"] = statistics.pstdev(xs) * 1e3 if xs else 0.0
        for p in pcts:
            out[f"p{p:g}_{name}_ms"] = _pct(xs, p) * 1e3
    out["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return out


_TITLES = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
           "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}


def format_table(s: dict, metrics: list[str], pcts: list[float]) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    row = lambda k, v: lines.append(f"{k:<40} {v:<10}")  # noqa: E731  (vLLM's layout)
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    if s["max_concurrency"]:
        row("Maximum request concurrency:", s["max_concurrency"])
    row("Benchmark duration (s):", f"{s['duration']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    for m in metrics:
        title, short = _TITLES[m]
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {short} (ms):", f"{s[f'mean_{m}_ms']:.2f}")
        row(f"Median {short} (ms):", f"{s[f'median_{m}_ms']:.2f}")
        for p in pcts:
            row(f"P{p:g} {short} (ms):", f"{s[f'p{p:g}_{m}_ms']:.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    metrics = [m for m in args.percentile_metrics.split(",") if m]
    for m in metrics:
        if m not in _TITLES:
            raise SystemExit(f"error: unknown metric {m!r} in --percentile-metrics (use ttft,tpot,itl,e2el)")
    s = asyncio.run(_bench(args))
    print(format_table(s, metrics, [float(p) for p in args.metric_percentiles.split(",") if p]))
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    if args.save_result:
        fname = args.result_filename or f"bench-serve-{int(time.time())}.json"
        with open(fname, "w", encoding="utf-8") as f:
            json.dump({**s, "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=2, default=str)
        print(f"saved {fname}")
    return 0 if s["completed"] else 1

