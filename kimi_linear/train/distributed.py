"""Process setup for training: one plain process, or many under torchrun (FSDP2 over a DeviceMesh).

`init_distributed(device)` reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE; with WORLD_SIZE > 1 it starts
the process group (gloo on the CPU, nccl on CUDA, each rank on cuda:LOCAL_RANK) and a 1-D data-parallel
mesh ("dp"). Without torchrun (or with one process) nothing is initialised and the same code runs.
`shard_model` applies FSDP2's `fully_shard` to every decoder layer, then to the root; it keeps fp32
parameters (the trainer casts to bf16 with autocast, so A_log, dt_bias and norms stay fp32 where the
model reads them) and reduces gradients in fp32. Build the optimizer after sharding.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: object | None  # DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment (0, 0, 1 without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from kimi_linear.errors import TrainConfigError

        raise TrainConfigError("--device", f"{device} requested but CUDA is not available")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    rank, local_rank, world = env_world()
    dev = resolve_device(device, local_rank)
    mesh = None
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30),
                                    **({"device_id": dev} if dev.type == "cuda" else {}))
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank, local_rank, world, dev, mesh)


def shard_model(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2: each decoder layer its own unit, then the root (embedding, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """FSDP2: skip (False) or do (True) the reduce-scatter of gradients in the next backward; no-op otherwise."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum Python numbers over the ranks (identity in one process), in float64."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
