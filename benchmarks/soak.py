"""Soak test of the OpenAI server: mixed traffic at a fixed concurrency for a fixed time (or a fixed number
of rounds), then the accounting: nothing lost, no 5xx, token counts exact, the engine empty afterwards,
memory flat over time.

    python -m benchmarks.soak --preset 48b-a3b-e64 --concurrency 256 --duration 1800   # H200, dummy weights
    python -m benchmarks.soak --preset 48b-a3b-e64 --concurrency 256 --duration 200 --time-budget 285 \
        --startup-timeout 150 --out $OUT/soak.json        # the GPU suite's `soak` part: all of it within 300 s
    python -m benchmarks.soak --smoke                                                 # CPU, tiny, seconds

By default the server is the real CLI (`kimi-linear serve`) in a subprocess on a preset folder written
here (a 48b preset: config only, weights drawn on the device with `--load-format dummy`); `--url` targets
a running server instead (`--server-pid` then names its process for the memory samples).

Traffic: each client loops over random requests (seeded): /v1/completions with token-id prompts
(streamed or not, n 1-3, seeds, stop_token_ids, logprobs) and, when the model has a tokenizer, text
completions with stop strings and chat completions (streamed or not, some with a json_schema). Requests
with `ignore_eos` and no stop rule must report exactly n * max_tokens completion tokens; over the whole
run the usage the clients received must equal the server's counters (generation_tokens, and the sums of
the per-request prompt / generation histograms).

Report (stdout, and JSON with --out): requests sent / completed / lost, errors by status, 5xx, p50 / p99
latency (and time to first token of streams), tokens per second, the server's startup time, and memory over
time (server RSS, GPU memory in use: a table of the samples) with the gauges read at each sample; at the
end the gauges must be back to 0.

`--time-budget S` bounds the whole run (server startup, traffic, the requests still in flight, the report,
the server's shutdown) to S seconds of wall time: the traffic lasts min(--duration, what the startup left
minus --drain-reserve), a request still unanswered at the budget's end (less 20 s for the shutdown) is cut
by the client and counted apart ("cut", not "lost"), and a server that does not exit in time is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kda_state_usage_perc")
CUT = "cut at the run's time budget"
SHUTDOWN_RESERVE_S = 20.0  # of --time-budget: kept for the server's shutdown


# ---------------------------------------------------------------- requests
@dataclass
class Spec:
    path: str
    body: dict
    stream: bool
    exact: bool  # ignore_eos and no stop rule: completion tokens must be n * max_tokens
    n: int
    num_prompts: int = 1


def make_spec(rng: random.Random, vocab: int, has_tokenizer: bool, max_tokens: int) -> Spec:
    """One random request of the mix."""
    kinds = ["ids"] + (["text", "chat"] if has_tokenizer else [])
    kind = rng.choice(kinds)
    stream = rng.random() < 0.5
    n = rng.choice([1, 1, 2, 3])
    mt = rng.randint(max(1, max_tokens // 4), max_tokens)
    body: dict = {"max_tokens": mt, "n": n, "stream": stream, "ignore_eos": True,
                  "temperature": rng.choice([0.0, 0.8])}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 2**31)
    exact = True
    if kind == "ids":
        path = "/v1/completions"
        num_prompts = 1 if stream or rng.random() < 0.7 else 2
        prompts = [[rng.randrange(1, vocab - 1) for _ in range(rng.randint(4, 48))] for _ in range(num_prompts)]
        body["prompt"] = prompts[0] if num_prompts == 1 else prompts
        if rng.random() < 0.2:
            body["stop_token_ids"] = [rng.randrange(1, vocab - 1)]
            exact = False
        if rng.random() < 0.2:
            body["logprobs"] = 2
        return Spec(path, body, stream, exact, n, num_prompts)
    if kind == "text":
        body["prompt"] = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "soak"]) for _ in range(12))
        if rng.random() < 0.5:
            body["stop"] = [rng.choice(["a", "e", " the", "\n"])]
            exact = False
        return Spec("/v1/completions", body, stream, exact, n)
    body["messages"] = [{"role": "user", "content": f"question {rng.randint(0, 999)}: say something"}]
    if rng.random() < 0.25:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
        exact = False
    return Spec("/v1/chat/completions", body, stream, exact, n)


@dataclass
class Result:
    status: int | None  # None: no complete answer (lost)
    latency: float
    ttft: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    texts: list[str] = field(default_factory=list)
    problem: str | None = None  # a complete answer that breaks a rule


async def send(client: httpx.AsyncClient, url: str, spec: Spec) -> Result:
    t0 = time.perf_counter()
    try:
        if not spec.stream:
            r = await client.post(url + spec.path, json=spec.body)
            lat = time.perf_counter() - t0
            if r.status_code != 200:
                return Result(r.status_code, lat)
            data = r.json()
            usage = data["usage"]
            texts = [c.get("text", c.get("message", {}).get("content")) for c in data["choices"]]
            res = Result(200, lat, None, usage["prompt_tokens"], usage["completion_tokens"], texts)
            if len(data["choices"]) != spec.n * spec.num_prompts:
                res.problem = f"{len(data['choices'])} choices for n={spec.n} x {spec.num_prompts} prompts"
        else:
            ttft, finished, usage, done = None, 0, None, False
            texts: dict[int, str] = {}
            async with client.stream("POST", url + spec.path, json=spec.body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return Result(r.status_code, time.perf_counter() - t0)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return Result(chunk["error"].get("code") or 500, time.perf_counter() - t0,
                                      problem=f"error event: {chunk['error']['message']}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for c in chunk["choices"]:
                        piece = c.get("text", (c.get("delta") or {}).get("content")) or ""
                        if piece and ttft is None:
                            ttft = time.perf_counter() - t0
                        texts[c["index"]] = texts.get(c["index"], "") + piece
                        finished += c.get("finish_reason") is not None
            lat = time.perf_counter() - t0
            if not done or usage is None:
                return Result(None, lat, problem="the stream ended without usage and [DONE]")
            res = Result(200, lat, ttft, usage["prompt_tokens"], usage["completion_tokens"],
                         [texts[i] for i in sorted(texts)])
            if finished != spec.n * spec.num_prompts:
                res.problem = f"{finished} finished choices for n={spec.n}"
        if spec.exact and res.completion_tokens != spec.n * spec.num_prompts * spec.body["max_tokens"]:
            res.problem = (f"completion_tokens {res.completion_tokens} != {spec.n * spec.num_prompts} x "
                           f"{spec.body['max_tokens']}")
        return res
    except (httpx.TransportError, json.JSONDecodeError, KeyError) as e:
        return Result(None, time.perf_counter() - t0, problem=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- server facts
def scrape(url: str) -> dict[str, float]:
    """The server's kimi_linear:* metrics (label-less sums)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"kimi_linear:(\w+?)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if m and "bucket" not in m.group(1):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _proc_rss_mb(pid: int) -> float | None:
    """VmRSS of `pid` from /proc (Linux), when psutil is not installed."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_sample(pid: int | None) -> dict:
    sample = {"t": time.time()}
    if pid is not None:
        try:
            import psutil

            sample["rss_mb"] = psutil.Process(pid).memory_info().rss / 2**20
        except Exception:  # noqa: BLE001 - psutil missing (the GPU image may lack it) or the process gone
            rss = _proc_rss_mb(pid)
            if rss is not None:
                sample["rss_mb"] = rss
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            sample["gpu_used_mb"] = sum(float(x) for x in out.stdout.split())
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    if "gpu_used_mb" not in sample and "torch" in sys.modules:  # no nvidia-smi: the driver's figure via torch
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                sample["gpu_used_mb"] = (total - free) / 2**20
        except Exception:  # noqa: BLE001 - no usable device
            pass
    return sample


# ---------------------------------------------------------------- the run
async def run_traffic(url: str, concurrency: int, *, duration: float | None = None, rounds: int | None = None,
                      per_round: int = 1, seed: int = 0, vocab: int, has_tokenizer: bool, max_tokens: int,
                      pid: int | None = None, sample_every: float = 10.0, timeout: float = 600.0,
                      api_key: str | None = None, deadline: float | None = None) -> dict:
    """Mixed traffic from `concurrency` clients, for `duration` seconds, or for `rounds` rounds in which each
    client sends the same `per_round` requests again (so seeded outputs can be compared across rounds).
    `deadline` (a time.perf_counter() value): requests unanswered then are cut (Result problem CUT)."""
    assert (duration is None) != (rounds is None)
    before = scrape(url)
    results: list[tuple[int, int, Spec, Result]] = []
    memory = [{**memory_sample(pid), **{g: before.get(g, 0.0) for g in GAUGES}}]
    stop_at = time.perf_counter() + duration if duration is not None else None
    t_start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:

        async def one(spec: Spec) -> Result:
            if deadline is None:
                return await send(client, url, spec)
            t0 = time.perf_counter()
            if t0 >= deadline:
                return Result(None, 0.0, problem=CUT)
            try:
                return await asyncio.wait_for(send(client, url, spec), timeout=deadline - t0)
            except asyncio.TimeoutError:
                return Result(None, time.perf_counter() - t0, problem=CUT)

        async def worker(c: int):
            if rounds is not None:
                specs = [make_spec(random.Random(seed * 1_000_003 + c * 1009 + j), vocab, has_tokenizer, max_tokens)
                         for j in range(per_round)]
                for _ in range(rounds):
                    for j, spec in enumerate(specs):
                        results.append((c, j, spec, await one(spec)))
                return
            rng = random.Random(seed * 1_000_003 + c)
            i = 0
            while time.perf_counter() < stop_at:
                spec = make_spec(rng, vocab, has_tokenizer, max_tokens)
                results.append((c, i, spec, await one(spec)))
                i += 1

        async def sampler():
            while True:
                await asyncio.sleep(sample_every)
                g = await asyncio.to_thread(scrape, url)
                m = await asyncio.to_thread(memory_sample, pid)  # nvidia-smi off the event loop
                memory.append({**m, **{k: g.get(k, 0.0) for k in GAUGES}})

        sampling = asyncio.ensure_future(sampler())
        await asyncio.gather(*(worker(c) for c in range(concurrency)))
        sampling.cancel()
    wall = time.perf_counter() - t_start
    # the engine empties right after the last answer (and a cut request is aborted): poll the gauges briefly
    poll_s = 30.0 if deadline is None else max(2.0, min(30.0, deadline - time.perf_counter()))
    poll_until = time.perf_counter() + poll_s
    after = scrape(url)
    while any(after.get(g, 0.0) for g in GAUGES) and time.perf_counter() < poll_until:
        time.sleep(0.1)
        after = scrape(url)
    memory.append({**memory_sample(pid), **{g: after.get(g, 0.0) for g in GAUGES}})
    return summarize(results, before, after, memory, wall, rounds)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(results, before: dict, after: dict, memory: list[dict], wall: float, rounds: int | None) -> dict:
    ok = [r for _, _, _, r in results if r.status == 200 and r.problem is None]
    cut = [r for _, _, _, r in results if r.problem == CUT]
    statuses: dict[str, int] = {}
    for _, _, _, r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    problems = [f"{s.path} {r.problem}" for _, _, s, r in results if r.problem and r.problem != CUT]
    prompt = sum(r.prompt_tokens for _, _, _, r in results if r.status == 200)
    completion = sum(r.completion_tokens for _, _, _, r in results if r.status == 200)
    # per finished request, as the usage counts them (prompt_tokens_total counts every sequence's prefill,
    # recomputation included, so n > 1 and preemption make it larger)
    d_prompt = after.get("request_prompt_tokens_sum", 0) - before.get("request_prompt_tokens_sum", 0)
    d_req_gen = after.get("request_generation_tokens_sum", 0) - before.get("request_generation_tokens_sum", 0)
    d_gen = after.get("generation_tokens_total", 0) - before.get("generation_tokens_total", 0)
    seeded_mismatch = num_seeded = 0
    if rounds:
        by_key: dict = {}
        for c, j, s, r in results:
            if "seed" in s.body and r.status == 200 and r.problem is None:
                by_key.setdefault((c, j), []).append(r.texts)
        num_seeded = len(by_key)
        seeded_mismatch = sum(1 for v in by_key.values() if any(t != v[0] for t in v[1:]))
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    rss = [m["rss_mb"] for m in memory if "rss_mb" in m]
    gpu = [m["gpu_used_mb"] for m in memory if "gpu_used_mb" in m]
    return {
        "sent": len(results), "completed": len(ok),
        "lost": sum(1 for _, _, _, r in results if r.status is None and r.problem != CUT), "cut": len(cut),
        "statuses": statuses, "num_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "problems": problems[:20], "num_problems": len(problems),
        "usage_prompt_tokens": prompt, "usage_completion_tokens": completion,
        "server_prompt_tokens": d_prompt, "server_generation_tokens": d_gen,
        "server_request_generation_tokens": d_req_gen,
        # a cut request's tokens were generated but never reported to its client: nothing to check then
        "tokens_exact": (prompt == d_prompt and completion == d_gen == d_req_gen) if not cut else None,
        "seeded_requests": num_seeded, "seeded_mismatches": seeded_mismatch,
        "gauges_after": {g: after.get(g, 0.0) for g in GAUGES},
        "leaks": any(after.get(g, 0.0) for g in GAUGES),
        "wall_s": wall, "requests_per_s": len(results) / wall if wall else None,
        "generation_tokens_per_s": d_gen / wall if wall else None,
        "latency_p50_s": _pct(lat, 0.5), "latency_p99_s": _pct(lat, 0.99),
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
        "rss_mb": {"first": rss[0], "max": max(rss), "last": rss[-1]} if rss else None,
        "gpu_used_mb": {"first": gpu[0], "max": max(gpu), "last": gpu[-1]} if gpu else None,
        "memory": memory,
    }


def has_tokenizer(url: str, api_key: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.post(url + "/tokenize", json={"prompt": "probe"}, headers=headers, timeout=30).status_code == 200


def vocab_of(folder: str) -> int:
    from kimi_linear.config import ModelConfig

    with open(os.path.join(folder, "config.json")) as f:
        return ModelConfig.from_dict(json.load(f)).vocab_size


# ---------------------------------------------------------------- server process
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> tuple[subprocess.Popen, str, int]:
    """Write the preset folder and start `kimi-linear serve` on it; returns (process, url, vocab size)."""
    from kimi_linear.tools.create import create_checkpoint, default_weights

    folder = args.model
    if folder is None:
        folder = os.path.join(tempfile.mkdtemp(prefix="soak-"), args.preset)
        create_checkpoint(folder, args.preset, seed=0, progress=False)
    vocab = vocab_of(folder)
    dummy = args.model is None and not default_weights(args.preset)
    port = _free_port()
    cmd = [sys.executable, "-m", "kimi_linear", "serve", folder, "--port", str(port), "--served-model-name", "soak",
           "--device", args.device, "--max-num-seqs", str(args.max_num_seqs), "--max-model-len",
           str(args.max_model_len), "--max-queue-len", str(max(4096, 2 * args.concurrency)),
           "--uvicorn-log-level", "warning", *(["--load-format", "dummy"] if dummy else []), *args.serve_args]
    log = open(os.path.join(os.path.dirname(folder) if args.model is None else tempfile.mkdtemp(), "serve.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                print_log_tail(log.name)
                raise SystemExit(f"serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url, vocab
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    except BaseException:  # a signal or ^C while the server starts: do not leave it running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    proc.kill()
    proc.wait()
    print_log_tail(log.name)
    raise SystemExit(f"serve did not become healthy in {args.startup_timeout:.0f} s; see {log.name}")


def print_log_tail(path: str, lines: int = 30) -> None:
    try:
        with open(path, errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return
    print(f"--- last {len(tail)} lines of {path} ---", flush=True)
    print("".join(tail), end="", flush=True)


def stop_server(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL if it has not exited within `wait_s` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=max(1.0, wait_s))
    except subprocess.TimeoutExpired:
        print(f"serve did not exit {wait_s:.0f} s after SIGTERM: killed", flush=True)
        proc.kill()
        proc.wait()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"soak: signal {signum}, stopping the server")


def print_report(rep: dict) -> None:
    start = rep.get("startup_s")
    print(f"=== soak: {rep['config'].get('preset')} on {rep['config'].get('device')}, concurrency "
          f"{rep['config'].get('concurrency')}" + (f", server startup {start:.1f} s" if start is not None else ""),
          flush=True)
    print(f"sent {rep['sent']}, completed {rep['completed']}, lost {rep['lost']}, cut at the time budget "
          f"{rep.get('cut', 0)}, 5xx {rep['num_5xx']}, statuses {rep['statuses']}, problems {rep['num_problems']}",
          flush=True)
    print(f"tokens: usage prompt {rep['usage_prompt_tokens']} / server {rep['server_prompt_tokens']:.0f}, usage "
          f"completion {rep['usage_completion_tokens']} / server {rep['server_generation_tokens']:.0f} "
          f"(exact: {rep['tokens_exact']}); gauges after {rep['gauges_after']}", flush=True)
    p = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"latency p50 {p(rep['latency_p50_s'])} s, p99 {p(rep['latency_p99_s'])} s; TTFT p50 {p(rep['ttft_p50_s'])}"
          f" s, p99 {p(rep['ttft_p99_s'])} s; {rep['requests_per_s']:.2f} req/s, "
          f"{rep['generation_tokens_per_s']:.1f} generated tok/s over {rep['wall_s']:.1f} s", flush=True)
    print(f"memory: RSS MB {rep['rss_mb']}, GPU used MB {rep['gpu_used_mb']}", flush=True)
    mem = rep["memory"]
    if mem:
        print("memory over time:    t s   RSS MB   GPU MB  running  waiting  kv usage  kda slots", flush=True)
        f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        for m in mem:
            print(f"                 {m['t'] - mem[0]['t']:>6.0f} {f(m.get('rss_mb')):>8} {f(m.get('gpu_used_mb')):>8} "
                  f"{f(m.get('num_requests_running')):>8} {f(m.get('num_requests_waiting')):>8} "
                  f"{f(m.get('kv_cache_usage_perc'), 3):>9} {f(m.get('kda_state_usage_perc'), 3):>10}", flush=True)
    for problem in rep["problems"][:5]:
        print(f"  problem: {problem}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="48b-a3b-e64", help="model shape preset (default 48b-a3b-e64, dummy weights)")
    ap.add_argument("--model", default=None, help="an existing checkpoint folder instead of a preset")
    ap.add_argument("--url", default=None, help="target this running server instead of starting one")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: the server's process, for RSS")
    ap.add_argument("--api-key", default=None, help="with --url: the server's API key")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of traffic (default 30 minutes; --smoke: 2 rounds instead)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds of wall time for the whole run: startup, traffic, in-flight requests, report, "
                         "shutdown")
    ap.add_argument("--drain-reserve", type=float, default=60.0,
                    help="with --time-budget: seconds kept after the traffic for the requests in flight and the gauges")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="client timeout of one request (s)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="instead of --duration: rounds in which each client sends the same requests again")
    ap.add_argument("--per-round", type=int, default=1, help="with --rounds: requests per client and round")
    ap.add_argument("--vocab-size", type=int, default=None, help="with --url and no --model: token ids stay below")
    ap.add_argument("--max-tokens", type=int, default=128, help="largest max_tokens of a request")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sample-every", type=float, default=30.0, help="seconds between memory samples")
    ap.add_argument("--startup-timeout", type=float, default=1800.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 8 clients, 2 rounds (CI)")
    ap.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                    help="extra flag for `kimi-linear serve` (repeatable)")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.duration is not None:
        raise SystemExit("give --duration or --rounds, not both")
    if args.smoke:
        args.preset, args.device, args.concurrency, args.max_tokens = "tiny", "cpu", 8, 8
        args.max_num_seqs, args.max_model_len, args.sample_every = 8, 512, 2.0
        if args.rounds is None and args.duration is None:
            args.rounds = 2
        args.startup_timeout = min(args.startup_timeout, 300.0)
    if args.rounds is None and args.duration is None:
        args.duration = 1800.0
    t_begin = time.perf_counter()
    budget_end = deadline = None
    if args.time_budget is not None:
        budget_end = t_begin + args.time_budget
        deadline = budget_end - SHUTDOWN_RESERVE_S
        room = args.time_budget - SHUTDOWN_RESERVE_S - args.drain_reserve
        if room <= 10:
            raise SystemExit(f"--time-budget {args.time_budget:.0f} s leaves no time for traffic after the "
                             f"{SHUTDOWN_RESERVE_S:.0f} s shutdown and {args.drain_reserve:.0f} s drain reserves")
        args.startup_timeout = min(args.startup_timeout, room - 10)
    proc = None
    startup_s = None
    if args.url is None:
        # a SIGTERM (the suite's `timeout`) unwinds through the `finally` below, so the server never outlives us
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        proc, url, vocab = launch(args)
        pid = proc.pid
        startup_s = time.perf_counter() - t_begin
        print(f"server healthy after {startup_s:.1f} s", flush=True)
    else:
        url, pid = args.url.rstrip("/"), args.server_pid
        vocab = args.vocab_size or (vocab_of(args.model) if args.model else None)
        if not vocab:
            raise SystemExit("with --url, give --vocab-size or --model (token-id prompts must stay in the vocabulary)")
    duration = args.duration
    if duration is not None and deadline is not None:
        duration = min(duration, budget_end - SHUTDOWN_RESERVE_S - args.drain_reserve - time.perf_counter())
        print(f"traffic for {duration:.0f} s (--duration {args.duration:.0f}, --time-budget {args.time_budget:.0f})",
              flush=True)
    try:
        rep = asyncio.run(run_traffic(url, args.concurrency, duration=duration,
                                      rounds=args.rounds, per_round=args.per_round, seed=args.seed, vocab=vocab,
                                      has_tokenizer=has_tokenizer(url, args.api_key), max_tokens=args.max_tokens,
                                      pid=pid, sample_every=args.sample_every, api_key=args.api_key,
                                      timeout=args.request_timeout, deadline=deadline))
    finally:
        if proc is not None:
            stop_server(proc, 120.0 if budget_end is None else min(120.0, budget_end - time.perf_counter()))
    rep["config"] = {k: v for k, v in vars(args).items() if k != "serve_args"}
    rep["startup_s"] = startup_s
    rep["traffic_s"] = duration
    rep["total_s"] = time.perf_counter() - t_begin
    print_report(rep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=2)
    return rep


if __name__ == "__main__":
    main()
