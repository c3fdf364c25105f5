"""`kimi-linear bench serve`: load-test an OpenAI-compatible server the way `vllm bench serve` does.

Sends `--num-prompts` streaming requests from a dataset (`bench_datasets.py`: random, prefix-repetition,
sharegpt; token ids for /v1/completions, text for /v1/chat/completions) at `--request-rate` (Poisson,
`inf` = all at once, optional burstiness) under `--max-concurrency`, with a progress bar, and reports,
with vLLM's names: TTFT (send -> first streamed token), TPOT ((e2e - TTFT) / (output tokens - 1) per
request), ITL (every gap between streamed chunks), E2EL, mean / median / chosen percentiles, request and
token throughput, and with `--goodput ttft:MS tpot:MS e2el:MS` (vLLM's SLO syntax) the rate of requests
meeting every SLO. `--save-result` writes strict JSON (an infinite request rate or a missing value is
null, never Infinity / NaN). Works against any OpenAI-compatible server, ours or vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import math
import statistics
import time
from dataclasses import dataclass, field

from kimi_linear.cli.bench_datasets import (DATASETS, DatasetError, SampleRequest, Vocab, prefix_repetition_requests,
                                            random_requests, sharegpt_requests)

GOODPUT_METRICS = ("ttft", "tpot", "e2el")

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
    p.add_argument("--dataset-name", default="random", choices=DATASETS)
    p.add_argument("--dataset-path", default=None, help="sharegpt: a local ShareGPT-format JSON file")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for the prompts (default: the server's /tokenizer_info)")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=32)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--prefix-repetition-prefix-len", type=int, default=256, help="tokens of each shared prefix")
    p.add_argument("--prefix-repetition-suffix-len", type=int, default=256, help="random tokens after the prefix")
    p.add_argument("--prefix-repetition-num-prefixes", type=int, default=10, help="distinct prefixes")
    p.add_argument("--prefix-repetition-output-len", type=int, default=128)
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="output length of every sharegpt request (default: its reference reply's)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs in ms, e.g. ttft:500 tpot:50 e2el:2000; reports the rate of requests meeting all")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so outputs have fixed lengths")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token-id range of random prompts (default: the tokenizer's vocabulary)")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.set_defaults(func=run)


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


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (ms); a bad item exits naming it."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_METRICS:
            raise SystemExit(f"error: --goodput {item!r}: use KEY:MS with KEY one of {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not (ms >= 0 and math.isfinite(ms)):
            raise SystemExit(f"error: --goodput {item!r}: the value must be a number of milliseconds >= 0")
        slos[key] = ms
    return slos


def _vocab(args, base: str, headers: dict) -> Vocab | None:
    vocab = Vocab.from_folder(args.tokenizer) if args.tokenizer else Vocab.from_server(base, headers)
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise DatasetError(f"--vocab-size must be positive, got {args.vocab_size}")
        special = frozenset(i for i in (vocab.special_ids if vocab else ()) if i < args.vocab_size)
        vocab = Vocab(args.vocab_size, special, vocab.encode if vocab else None, vocab.decode if vocab else None)
    return vocab


def build_requests(args, base: str, headers: dict) -> list[SampleRequest]:
    """The benchmark's requests (see bench_datasets.py). Raises DatasetError."""
    rng = random.Random(args.seed)
    chat = args.backend == "openai-chat"
    vocab = _vocab(args, base, headers)
    n = args.num_prompts
    if args.dataset_name == "sharegpt":
        return sharegpt_requests(vocab, args.dataset_path, n, rng, args.sharegpt_output_len)
    if vocab is None:
        raise DatasetError("cannot learn the vocabulary: the server has no /tokenizer_info; give --tokenizer FOLDER "
                           "or --vocab-size N")
    if args.dataset_name == "prefix-repetition":
        return prefix_repetition_requests(vocab, n, args.prefix_repetition_prefix_len,
                                          args.prefix_repetition_suffix_len, args.prefix_repetition_num_prefixes,
                                          args.prefix_repetition_output_len, rng, as_text=chat)
    return random_requests(vocab, n, args.random_input_len, args.random_output_len, args.random_range_ratio, rng,
                           as_text=chat)


async def _bench(args, base: str, headers: dict, model: str, requests: list[SampleRequest]) -> dict:
    import httpx

    chat = args.backend == "openai-chat"
    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    rng = random.Random(args.seed + 1)
    bodies = []
    for req in requests:
        body = {"model": model, "max_tokens": req.output_len, "stream": True, "temperature": 0.0,
                "stream_options": {"include_usage": True}}
        if args.ignore_eos:
            body["ignore_eos"] = True
        if chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        bodies.append(body)
    bar = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        bar = tqdm(total=len(bodies), desc="requests", unit="req")
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000)
    async with httpx.AsyncClient(limits=limits) as client:
        async def limited(body):
            if sem is None:
                res = await _one(client, base + endpoint, body, headers, chat, args.timeout)
            else:
                async with sem:
                    res = await _one(client, base + endpoint, body, headers, chat, args.timeout)
            if bar is not None:
                bar.update(1)
            return res

        tasks = []
        start = time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if args.request_rate != float("inf"):
                theta = 1.0 / (args.request_rate * args.burstiness)
                await asyncio.sleep(rng.gammavariate(args.burstiness, theta))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return summarize(results, duration, args, model, [r.prompt_len for r in requests])


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def _tpot(r: RequestResult) -> float | None:
    n = r.output_tokens or len(r.itls) + 1
    return (r.e2e - r.ttft) / (n - 1) if n > 1 else None


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
        "tpot": [t for r in ok if (t := _tpot(r)) is not None],
        "itl": [x for r in ok for x in r.itls],
        "e2el": [r.e2e for r in ok],
    }
    slos = parse_goodput(getattr(args, "goodput", None))
    if slos:
        def good(r: RequestResult) -> bool:
            got = {"ttft": r.ttft, "tpot": _tpot(r) or 0.0, "e2el": r.e2e}
            return all(got[k] * 1e3 <= ms for k, ms in slos.items())

        out["goodput_slos_ms"] = slos
        out["request_goodput"] = sum(good(r) for r in ok) / duration if duration else 0.0
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
    if "request_goodput" in s:
        row("Request goodput (req/s):", f"{s['request_goodput']:.2f}")
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


def strict_json(x):
    """`x` with every non-finite float (an infinite request rate, a NaN) as None, so json.dump writes valid JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def _model_name(base: str, headers: dict, timeout: float) -> str:
    import httpx

    try:
        r = httpx.get(base + "/v1/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise SystemExit(f"error: cannot reach {base}: {e}") from None
    if r.status_code != 200:
        raise SystemExit(f"error: {base}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    return r.json()["data"][0]["id"]


def run(args: argparse.Namespace) -> int:
    metrics = [m for m in args.percentile_metrics.split(",") if m]
    for m in metrics:
        if m not in _TITLES:
            raise SystemExit(f"error: unknown metric {m!r} in --percentile-metrics (use ttft,tpot,itl,e2el)")
    parse_goodput(args.goodput)  # a bad SLO fails before any request
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or _model_name(base, headers, 30.0)
    try:
        requests = build_requests(args, base, headers)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    s = asyncio.run(_bench(args, base, headers, model, requests))
    print(format_table(s, metrics, [float(p) for p in args.metric_percentiles.split(",") if p]))
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    if args.save_result:
        fname = args.result_filename or f"bench-serve-{int(time.time())}.json"
        with open(fname, "w", encoding="utf-8") as f:
            record = {**s, "args": {k: v for k, v in vars(args).items() if k != "func"}}
            json.dump(strict_json(record), f, indent=2, default=str, allow_nan=False)
        print(f"saved {fname}")
    return 0 if s["completed"] else 1

