"""How much training one GPU gives the synthetic suite: steps/s and tokens/s of `kimi-linear synthetic`'s step.

    python -m benchmarks.synthetic_probe --json synthetic_probe.json            # on the GPU, <= --budget-s (120)
    python -m benchmarks.synthetic_probe --quick --json /tmp/p.json            # CPU smoke test, tiny sizes

The step is `train_one.Trainer.step` (forward + backward + clip + AdamW, bf16 autocast on CUDA) on batches
generated before the clock starts (their generation is timed on its own: `gen_ms`, the host cost the suite's
prefetching worker hides). Two parts, each measurement `--measure-s` long after a 2-step warm-up:

1. one process (this one): every mixer x length x tokens-per-step;
2. `--concurrency` worker processes at once (spawned once, reused), each training the same configuration:
   the aggregate steps/s against the one-process rate says whether the suite should run its runs side by
   side (kernels of different processes time-slice the GPU: without MPS they never overlap).

Every measurement first checks what is left of `--budget-s` and is skipped (listed as such) if it does not fit.
Prints a table; writes the JSON to `--json`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import torch

WARMUP_STEPS = 2


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spec(task: str, mixer: str, seq_len: int, batch_tokens: int, hidden_size: int):
    from kimi_linear.train.synthetic.train_one import RunSpec

    return RunSpec(task=task, mixer=mixer, seq_len=seq_len, batch_tokens=batch_tokens, min_batch=1,
                   hidden_size=hidden_size)


class _Measure:
    """One configuration built and warmed up, ready to time (`run(seconds) -> (steps, seconds)`)."""

    def __init__(self, spec, device: torch.device):
        from kimi_linear.train.synthetic.tasks import make_task
        from kimi_linear.train.synthetic.train_one import Trainer

        self.device = device
        task = make_task(spec.task, spec.mqar_vocab)
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        self.batches = [task.generate(spec.batch, spec.seq_len, gen) for _ in range(2)]
        self.gen_ms = (time.perf_counter() - t0) / 2 * 1e3
        if device.type == "cuda":
            self.batches = [(x.pin_memory(), y.pin_memory()) for x, y in self.batches]
        self.trainer = Trainer(spec, device, task.vocab_size)
        for i in range(WARMUP_STEPS):
            self.trainer.step(*self.batches[i % 2])
        _sync(device)

    def run(self, seconds: float) -> tuple[int, float]:
        steps = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(4):  # a few steps between clock reads; the launch queue bounds the run-ahead
                self.trainer.step(*self.batches[steps % 2])
                steps += 1
            if steps % 16 == 0:
                _sync(self.device)
        _sync(self.device)
        return steps, time.perf_counter() - t0

    def close(self) -> None:
        del self.trainer
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- worker processes


def _worker(conn, device: str) -> None:
    """A concurrent worker: ("build", spec) -> "ready" | error; ("go", seconds) -> (steps, seconds); ("stop",)."""
    torch.set_num_threads(1)
    from kimi_linear.train.synthetic.train_one import RunSpec

    measure = None
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "build":
                if measure is not None:
                    measure.close()
                measure = _Measure(RunSpec(**msg[1]), torch.device(device))
                conn.send(("ready",))
            elif msg[0] == "go":
                conn.send(("done", *measure.run(msg[1])))
            else:
                return
        except Exception as e:  # reported, the parent lists the measurement as failed
            conn.send(("error", f"{type(e).__name__}: {e}"))
            measure = None


class _Pool:
    def __init__(self, size: int, device: str):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, device), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def measure(self, spec, k: int, seconds: float, timeout: float) -> dict:
        conns = self.conns[:k]
        for c in conns:
            c.send(("build", spec.to_dict()))
        replies = [self._recv(c, timeout) for c in conns]
        errors = [r[1] for r in replies if r[0] != "ready"]
        if errors:
            return {"error": errors[0]}
        for c in conns:
            c.send(("go", seconds))
        replies = [self._recv(c, seconds + timeout) for c in conns]
        errors = [r[1] for r in replies if r[0] != "done"]
        if errors:
            return {"error": errors[0]}
        rates = [steps / secs for _, steps, secs in replies]
        return {"steps_per_s_each": [round(r, 3) for r in rates], "steps_per_s": sum(rates)}

    @staticmethod
    def _recv(conn, timeout: float):
        if not conn.poll(timeout):
            return ("error", f"no answer in {timeout:.0f} s")
        return conn.recv()

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------- the probe


def probe(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    device = torch.device(args.device)
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "task": args.task, "hidden_size": args.hidden_size, "measure_s": args.measure_s,
              "budget_s": args.budget_s, "single": [], "concurrent": [], "skipped": []}
    single = {}
    for seq_len in args.lengths:
        for bt in args.batch_tokens:
            for mixer in args.mixers:
                spec = _spec(args.task, mixer, seq_len, bt, args.hidden_size)
                key = dict(mixer=mixer, seq_len=seq_len, batch_tokens=bt, batch=spec.batch)
                if left() < args.measure_s + args.build_s:
                    result["skipped"].append({**key, "processes": 1})
                    continue
                t0 = time.perf_counter()
                try:
                    m = _Measure(spec, device)
                except Exception as e:  # e.g. out of memory: recorded, the probe goes on
                    result["single"].append({**key, "processes": 1, "error": f"{type(e).__name__}: {e}"})
                    continue
                build_s = time.perf_counter() - t0
                steps, secs = m.run(args.measure_s)
                peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
                m.close()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rate = steps / secs
                row = {**key, "processes": 1, "steps": steps, "steps_per_s": rate,
                       "tokens_per_s": rate * spec.batch * seq_len, "ms_per_step": 1e3 / rate,
                       "gen_ms": m.gen_ms, "build_s": build_s, "peak_gib": peak}
                result["single"].append(row)
                single[(mixer, seq_len, bt)] = row
                print(_fmt(row), flush=True)
    targets = [(m, n, bt) for m, n, bt in args.concurrent_configs if (m, n, bt) in single]
    levels = sorted(k for k in args.concurrency if k > 1)
    if targets and levels and left() > args.pool_start_s + args.measure_s + args.build_s:
        pool = _Pool(max(levels), args.device)
        try:
            for mixer, seq_len, bt in targets:
                spec = _spec(args.task, mixer, seq_len, bt, args.hidden_size)
                for k in levels:
                    key = dict(mixer=mixer, seq_len=seq_len, batch_tokens=bt, batch=spec.batch, processes=k)
                    if left() < args.measure_s + args.build_s + (args.pool_start_s if k == levels[0] else 0):
                        result["skipped"].append(key)
                        continue
                    got = pool.measure(spec, k, args.measure_s, timeout=max(left(), 30.0))
                    row = {**key, **got}
                    if "steps_per_s" in got:
                        base = single[(mixer, seq_len, bt)]["steps_per_s"]
                        row.update(tokens_per_s=got["steps_per_s"] * spec.batch * seq_len,
                                   speedup_vs_1=got["steps_per_s"] / base)
                    result["concurrent"].append(row)
                    print(_fmt(row), flush=True)
        finally:
            pool.close()
    else:
        result["skipped"] += [dict(mixer=m, seq_len=n, batch_tokens=bt, processes=k)
                              for m, n, bt in targets for k in levels]
    result["elapsed_s"] = time.perf_counter() - start
    return result


def _fmt(row: dict) -> str:
    head = f"{row['mixer']:4s} T={row['seq_len']:5d} tokens/step={row['batch_tokens']:7d} procs={row['processes']:2d}"
    if "error" in row:
        return f"{head}  error: {row['error']}"
    text = f"{head}  {row['steps_per_s']:8.2f} steps/s  {row['tokens_per_s'] / 1e6:7.3f} Mtok/s"
    if row["processes"] == 1:
        text += f"  {row['ms_per_step']:8.1f} ms/step  gen {row['gen_ms']:6.1f} ms"
    else:
        text += f"  x{row['speedup_vs_1']:.2f} vs 1 process"
    return text


def table(result: dict) -> str:
    lines = [f"synthetic step on {result['device']} (task {result['task']}, {result['measure_s']} s per measurement, "
             f"{result['elapsed_s']:.0f} s in all)",
             "| mixer | T | tokens/step | processes | steps/s | Mtok/s | ms/step | gen ms | vs 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["single"] + result["concurrent"]:
        if "error" in row:
            lines.append(f"| {row['mixer']} | {row['seq_len']} | {row['batch_tokens']} | {row['processes']} | "
                         f"error: {row['error']} | | | | |")
            continue
        head = f"| {row['mixer']} | {row['seq_len']} | {row['batch_tokens']} | {row['processes']} | "
        rate = f"{row['steps_per_s']:.2f} | {row['tokens_per_s'] / 1e6:.3f} | "
        if row["processes"] == 1:
            lines.append(head + rate + f"{row['ms_per_step']:.1f} | {row['gen_ms']:.1f} | 1 |")
        else:
            lines.append(head + rate + f"| | {row['speedup_vs_1']:.2f} |")
    if result["skipped"]:
        lines.append(f"skipped (budget): {len(result['skipped'])} measurements")
    return "\n".join(lines)


QUICK = dict(lengths=[16], batch_tokens=[64], mixers=["kda", "gdn", "mla"], concurrency=[2], measure_s=0.3,
             hidden_size=64, budget_s=60.0, build_s=5.0, pool_start_s=30.0, concurrent_configs=[("mla", 16, 64)])


def _configs(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        if item.strip():
            mixer, seq_len, bt = item.split(":")
            out.append((mixer, int(seq_len), int(bt)))
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="mqar", help="task whose batches (and vocabulary) the step trains on")
    p.add_argument("--mixers", type=_csv(str), default=["kda", "gdn", "mla"])
    p.add_argument("--lengths", type=_csv(int), default=[1024, 2048])
    p.add_argument("--batch-tokens", type=_csv(int), default=[16384, 65536, 131072])
    p.add_argument("--concurrency", type=_csv(int), default=[4, 8, 16], help="worker processes at once")
    p.add_argument("--concurrent-configs", type=_configs, default=_configs("kda:1024:16384,mla:1024:16384,kda:1024:65536"),
                   help="MIXER:T:TOKENS configurations measured with --concurrency processes")
    p.add_argument("--measure-s", type=float, default=3.0, help="seconds of each measurement")
    p.add_argument("--build-s", type=float, default=3.0, help="allowance for building and warming a configuration")
    p.add_argument("--pool-start-s", type=float, default=25.0, help="allowance for starting the worker processes")
    p.add_argument("--budget-s", type=float, default=120.0, help="wall-clock budget of the whole probe")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes, 2 processes, < 1 minute")
    args = p.parse_args(argv)
    if args.quick:
        defaults = vars(p.parse_args([]))
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    result = probe(args)
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
