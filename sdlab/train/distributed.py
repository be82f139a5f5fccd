"""Many processes: set up by `torchrun` (environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

Backend nccl on CUDA, gloo on CPU. One process (no torchrun) is the degenerate case and needs no
process group at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device(device or "cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local_rank, chosen)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(info: DistInfo, value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes (the tensor itself with one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size
