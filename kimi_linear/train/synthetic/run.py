"""The synthetic suite: every (task, length, mixer) run as its own worker process, then the table and plots.

`plan(...)` lists the `RunSpec`s; `run_suite(...)` warms the Triton cache once (two steps of each linear mixer
in one worker process, so the workers load compiled kernels instead of all compiling them at once), then
deals the runs into `workers` lanes (`lanes`: each run to the lane with the least share so far, so the lanes
carry equal weights), one worker process each (`worker.py`: the imports and the CUDA context are paid once per
lane, not per run), all on the one device until the suite's `budget_s` ends: a lane gives each of its runs its
`share` of the lane's time left (capped by the run's own `wall_s`), and a lane still alive `GRACE_S` after the
budget is killed. Few lanes: processes time-slice one GPU (their kernels never
overlap without MPS), so more runs at once only split the device finer, and each costs a CPU process. Every worker appends its evaluations to OUT/curves.jsonl as it
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


def plan(tasks, lengths, mixers, shares: dict[str, float] | None = None, **spec_fields) -> list[RunSpec]:
    """One spec per (task, length, mixer), the longest lengths first (they gain most from starting early); a
    run's `share` is the product of `shares`' values for its task and its mixer (1 where a name is absent)."""
    shares = shares or {}
    return [RunSpec(task=t, mixer=m, seq_len=n, share=shares.get(t, 1.0) * shares.get(m, 1.0), **spec_fields)
            for n in sorted(lengths, reverse=True) for t in tasks for m in mixers]


def lanes(specs: list[RunSpec], workers: int) -> list[list[RunSpec]]:
    """Deal `specs` (in order) into `workers` lanes: each to the lane whose shares sum least (ties: the first),
    so every lane carries about the same weight and mixes lengths and tasks."""
    out = [[] for _ in range(min(workers, len(specs)))]
    for s in specs:
        min(out, key=lambda lane: sum(x.share for x in lane)).append(s)
    return out


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
    deadline = time.time() + budget_s - (time.perf_counter() - start) - STARTUP_S
    running = []
    for lane in lanes(specs, workers):
        proc = subprocess.Popen([sys.executable, "-m", "kimi_linear.train.synthetic.worker",
                                 json.dumps([s.to_dict() for s in lane]), curves, repr(deadline)], env=env)
        running.append((proc, lane))
        logger.info("started a lane of %d runs: %s", len(lane), ", ".join(s.key for s in lane))
    while running:
        still = []
        for proc, lane in running:
            if proc.poll() is not None:
                logger.info("lane %s finished (exit %d)", lane[0].key, proc.returncode)
            elif time.time() > deadline + GRACE_S:
                proc.kill()
                proc.wait()
                logger.warning("killed the lane of %s at the budget's end", lane[0].key)
            else:
                still.append((proc, lane))
        running = still
        time.sleep(0.5)
    return curves
