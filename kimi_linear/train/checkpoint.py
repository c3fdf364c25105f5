"""Training checkpoints: DCP (`torch.distributed.checkpoint`) folders that `--resume` continues exactly.

A checkpoint folder OUT/checkpoints/step-NNNNNN holds
- the DCP shards of {"model", "optim", "trainer"}: model and optimizer state through
  `get_state_dict` / `set_state_dict` (sharded DTensors under FSDP2, reshardable; plain tensors in one
  process), and the rank-independent trainer state: step, scheduler state, the run's config;
- `rank-R.pt` per rank: that rank's data-loader position and RNG states (torch CPU, CUDA, Python);
- `DONE`, written last by rank 0: a folder without it is an interrupted save and is never resumed from.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kimi_linear.errors import TrainConfigError
from kimi_linear.train.distributed import barrier

DONE = "DONE"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step-{step:06d}")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(path: str, model, optimizer, trainer_state: dict, loader_state: dict, rank: int) -> None:
    """Write checkpoint `path` (every rank calls this: the model and optimizer saves are collective)."""
    os.makedirs(path, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd, "trainer": trainer_state}, checkpoint_id=path)
    torch.save({"loader": loader_state, "rng": rng_state()}, os.path.join(path, f"rank-{rank}.pt"))
    barrier()
    if rank == 0:
        with open(os.path.join(path, DONE), "w") as f:
            f.write(f"{trainer_state['step']}\n")


def resolve(path: str) -> str:
    """The checkpoint folder `--resume path` means: itself, or the latest complete one under path/checkpoints."""
    if os.path.isfile(os.path.join(path, DONE)):
        return path
    root = os.path.join(path, "checkpoints")
    steps = sorted((int(m.group(1)), d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                   if (m := STEP_DIR.match(d)) and os.path.isfile(os.path.join(root, d, DONE)))
    if not steps:
        raise TrainConfigError("--resume", f"{path} is no complete checkpoint and holds none under checkpoints/")
    return os.path.join(root, steps[-1][1])


def load(path: str, model, optimizer, trainer_template: dict, rank: int) -> tuple[dict, dict]:
    """Restore model and optimizer in place from checkpoint `path`; return (trainer state, loader state)
    and set this rank's RNG states. `trainer_template` has the trainer state's structure (DCP loads the
    keys it is given)."""
    rank_file = os.path.join(path, f"rank-{rank}.pt")
    if not os.path.isfile(rank_file):
        raise TrainConfigError("--resume", f"{path} has no state for rank {rank} (saved with fewer processes?)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": trainer_template}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(rank_file, weights_only=False)
    set_rng_state(extra["rng"])
    return state["trainer"], extra["loader"]
