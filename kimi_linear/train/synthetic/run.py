"""The synthetic suite: every (task, length, mixer) run as its own worker process, then the table and plots.

`plan(...)` lists the `RunSpec`s; `run_suite(...)` warms the Triton cache once (two steps of each linear mixer
in one worker process, so the workers load compiled kernels instead of all compiling them at once), then
starts the workers (`worker.py`), at most `workers` at a time on the one device, each with its own step and
wall-clock budget, all within the suite's `budget_s` (a run started late gets what is left, and a worker still
alive `GRACE_S` after its budget is killed). Every worker appends its evaluations to OUT/curves.jsonl as it
measures them, so the report (`report.py`, `plot.py`) of a suite cut short shows what was measured.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from kimi_linear.train.synthetic.train_one import RunSpec

logger = logging.getLogger(__name__)

GRACE_S = 30.0
STARTUP_S = 20.0  # a worker's imports and CUDA context before its run's clock starts
CURVES_FILE = "curves.jsonl"


def plan(tasks, lengths, mixers, **spec_fields) -> list[RunSpec]:
    """One spec per (task, length, mixer), the longest lengths first (they gain most from starting early)."""
    return [RunSpec(task=t, mixer=m, seq_len=n, **spec_fields)
            for n in sorted(lengths, reverse=True) for t in tasks for m in mixers]


def warm_up(specs: list[RunSpec], out_dir: str, env: dict) -> None:
    """Compile the kernels once, before the workers start: two steps of each linear mixer at the shortest length,
    each in a worker process of its own (so this process never holds a CUDA context; the Triton cache on disk is
    what the workers share). Its records go to a scratch file that is then removed."""
    scratch = os.path.join(out_dir, "warmup.jsonl")
    seen = set()
    for s in sorted(specs, key=lambda s: s.seq_len):
        if s.mixer in seen or s.mixer == "mla":  # full attention compiles no Triton kernel in training
            continue
        seen.add(s.mixer)
        t0 = time.perf_counter()
        w = RunSpec(**{**s.to_dict(), "steps": 2, "eval_every": 2, "eval_sequences": s.batch, "wall_s": 120})
        try:
            subprocess.run([sys.executable, "-m", "kimi_linear.train.synthetic.worker", json.dumps(w.to_dict()),
                            scratch], env=env, timeout=150)
        except subprocess.TimeoutExpired:  # the runs then compile for themselves
            logger.warning("warm-up %s did not finish in 150 s", s.mixer)
        logger.info("warm-up %s: %.1f s", s.mixer, time.perf_counter() - t0)
    if os.path.exists(scratch):
        os.remove(scratch)


def _exclusive_gpu() -> bool:
    """Whether the GPU runs in an exclusive compute mode (one process at a time), per nvidia-smi."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        return False
    try:
        mode = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "exclusive" in mode.lower()


def run_suite(specs: list[RunSpec], out_dir: str, workers: int, budget_s: float, device: str = "auto",
              warmup: bool = True) -> str:
    """Run `specs` (worker processes, `workers` at a time) within `budget_s` seconds; return the curves file."""
    import torch

    os.makedirs(out_dir, exist_ok=True)
    curves = os.path.join(out_dir, CURVES_FILE)
    if os.path.exists(curves):
        os.remove(curves)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    env = {**os.environ, "KIMI_LINEAR_SYNTHETIC_DEVICE": device, "PYTHONUNBUFFERED": "1"}
    if device.startswith("cuda") and workers > 1 and _exclusive_gpu():
        logger.warning("the GPU is in an exclusive compute mode: one run at a time")
        workers = 1
    if warmup and device.startswith("cuda"):
        warm_up(specs, out_dir, env)
    pending = list(specs)
    running: list[tuple[subprocess.Popen, RunSpec, float, float]] = []
    while pending or running:
        now = time.perf_counter()
        left = budget_s - (now - start)
        while pending and len(running) < workers and left > STARTUP_S + 5:
            spec = pending.pop(0)
            spec = RunSpec(**{**spec.to_dict(), "wall_s": max(min(spec.wall_s, left - STARTUP_S), 1.0)})
            proc = subprocess.Popen([sys.executable, "-m", "kimi_linear.train.synthetic.worker",
                                     json.dumps(spec.to_dict()), curves], env=env)
            running.append((proc, spec, now, spec.wall_s))
            logger.info("started %s (wall %.0f s, batch %d)", spec.key, spec.wall_s, spec.batch)
        if left <= STARTUP_S + 5 and pending:
            logger.warning("budget spent: %d runs not started (%s)", len(pending), ", ".join(s.key for s in pending))
            pending.clear()
        still = []
        for proc, spec, t0, wall in running:
            if proc.poll() is not None:
                logger.info("finished %s (exit %d, %.0f s)", spec.key, proc.returncode, time.perf_counter() - t0)
            elif time.perf_counter() - t0 > wall + STARTUP_S + GRACE_S:
                proc.kill()
                proc.wait()
                logger.warning("killed %s after %.0f s", spec.key, time.perf_counter() - t0)
            else:
                still.append((proc, spec, t0, wall))
        running = still
        time.sleep(0.5)
    return curves
