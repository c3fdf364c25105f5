"""Helpers shared by the benchmarks: timing (do_bench, CUDA-graph replays), the ceilings measured in
the same run (copy bandwidth, matmul rate), relative error, importing the fla peer, a timestamped log, and
the model-shape flags (`--preset` or `--model`) with the config.json dict they name.

Every benchmark runs from the repository root as a module, `python -m benchmarks.NAME`: the root is
then on sys.path, so `kimi_linear` and `benchmarks` import without installing or path edits.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
import time
import types

import torch

T0 = time.time()


def add_shape_args(ap, preset_default: str | None, preset_help: str) -> None:
    """`--preset NAME` or `--model DIR` (one of the two): the shape a benchmark builds its engine from."""
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=preset_default, help=preset_help)
    src.add_argument("--model", help="a checkpoint folder whose config.json gives the shape (weights not read)")


def shape_config(args) -> dict:
    """The official-format config dict `add_shape_args`' flags name: DIR/config.json, else the preset's."""
    from kimi_linear.tools.presets import preset_config

    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            return json.load(f)
    return preset_config(args.preset)


def log(msg: str) -> None:
    """Print `msg` after the seconds since the benchmark started."""
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- timing
def bench_ms(fn, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench (the L2 cache is flushed between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def capture_graph(step, n_steps: int = 1) -> torch.cuda.CUDAGraph:
    """One CUDA graph of step(0), ..., step(n_steps - 1), captured after a warm-up pass on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_steps):
            step(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_steps):
            step(i)
    return graph


def graph_time_ms(step, n_steps: int = 1, **bench_kw) -> float:
    """Milliseconds per step of step(i), i < n_steps, captured in one CUDA graph: the median replay / n_steps."""
    graph = capture_graph(step, n_steps)
    return bench_ms(graph.replay, **bench_kw) / n_steps


def wall_ms(fn) -> float:
    """Milliseconds that fn() takes by the host clock (for the CPU)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------- ceilings
def copy_bandwidth(nbytes: int = 1 << 30, device: torch.device | str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write counted: the do_bench median on CUDA, the
    median of 20 timed copies elsewhere."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = bench_ms(lambda: dst.copy_(src))
    else:
        for _ in range(3):
            dst.copy_(src)
        ms = statistics.median(wall_ms(lambda: dst.copy_(src)) for _ in range(20))
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(n: int = 8192, device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> float:
    """Matmul rate in FLOP/s of an n x n x n product (default bf16 on the GPU): the do_bench median on CUDA,
    the median of 10 timed products elsewhere."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    if device.type == "cuda":
        ms = bench_ms(lambda: a @ b)
    else:
        for _ in range(2):
            a @ b
        ms = statistics.median(wall_ms(lambda: a @ b) for _ in range(10))
    return 2 * n ** 3 / (ms * 1e-3)


# ---------------------------------------------------------------- numerics
def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64."""
    ref, got = ref.double(), got.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- the fla peer
def import_fla(module: str):
    """The fla-core module `module` (e.g. "fla.ops.kda"), or None (with a note) when fla is unavailable.

    fla's package __init__ imports every op, some of which import einops at module level; the ops timed
    here never call it. Without einops installed, a stub that raises on use lets the import succeed
    (any real use fails loudly and is reported as an fla failure)."""
    try:
        import einops  # noqa: F401
    except ImportError:
        stub = types.ModuleType("einops")

        def unavailable(*args, **kwargs):
            raise NotImplementedError("einops is not installed (stub from benchmarks/common.py)")

        for name in ("rearrange", "repeat", "reduce", "einsum", "pack", "unpack", "parse_shape"):
            setattr(stub, name, unavailable)
        sys.modules["einops"] = stub
        print("note: einops not installed; a raising stub satisfies fla's imports", flush=True)
    try:
        return importlib.import_module(module)
    except Exception as e:  # not installed, or broken
        print(f"fla not available: {e!r}", flush=True)
        return None


class CompileLog:
    """Counts Triton JIT compilations (kernel name and seconds) through Triton's runtime hooks, so a
    benchmark can tell a one-time compile from a steady cost: `log = CompileLog.install()`, then
    `log.take()` returns and clears [(kernel, seconds), ...] since the last take. Inert (empty) until
    `install()` and where the installed Triton has no such hooks."""

    def __init__(self):
        self._events: list[tuple[str, float]] = []
        self._t0: float | None = None

    def install(self) -> "CompileLog":
        try:
            from triton import knobs
        except ImportError:
            return self

        def before(**kw):
            self._t0 = time.perf_counter()
            return False  # never skip the compile

        def after(**kw):
            fn = kw.get("fn")
            name = getattr(fn, "name", None) or str(kw.get("repr", "?")).split("[")[0]
            self._events.append((name, time.perf_counter() - self._t0 if self._t0 else 0.0))
            self._t0 = None

        knobs.runtime.jit_cache_hook = before
        knobs.runtime.jit_post_compile_hook = after
        return self

    def take(self) -> list[tuple[str, float]]:
        out, self._events = self._events, []
        return out

    @staticmethod
    def summary(events: list[tuple[str, float]]) -> str:
        if not events:
            return "0 compiles"
        by: dict[str, list[float]] = {}
        for name, s in events:
            by.setdefault(name, []).append(s)
        top = sorted(by.items(), key=lambda kv: -sum(kv[1]))[:6]
        return (f"{len(events)} compiles, {sum(s for _, s in events):.1f} s: "
                + ", ".join(f"{n} x{len(v)} {sum(v):.1f}s" for n, v in top))


def write_report(report: dict, name: str, path: str | None = None) -> None:
    """Write `report` as JSON to $OUT/`name` (when $OUT is set: the device tool brings it back) and to `path`."""
    paths = ([os.path.join(os.environ["OUT"], name)] if os.environ.get("OUT") else []) + ([path] if path else [])
    for p in paths:
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        with open(p, "w") as f:
            json.dump(report, f, indent=2)
