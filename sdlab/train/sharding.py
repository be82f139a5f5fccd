"""Fully sharded data parallel training (`TrainConfig.sharding="fsdp"`): PyTorch's FSDP2 (`fully_shard`;
Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel") over the networks that
train, so each of N processes holds 1/N of their weights, gradients and AdamW moments.

Each trained network is sharded per block (the items of its first-level `nn.ModuleList`s: UNet down/up
blocks, the mid block's resnets and attentions, text-encoder layers), then as a whole for what is left (the
UNet's conv_in, time embedding; a text encoder's embeddings and final LayerNorm). A block's weights are
all-gathered just before its forward and freed after; gradients are reduce-scattered (averaged) as the
backward leaves each block. The frozen networks (VAE, untrained text encoders) stay whole on every process.

The optimizer, clipping and EMA work on each rank's plain shards (`Shards`). What leaves the processes is
whole: checkpoints hold full, unsharded state dicts gathered onto rank 0 (`gather`: what
`torch.distributed.checkpoint.state_dict.get_model_state_dict` with full_state_dict and cpu_offload gives, in
a few all-gathers; the optimizer's keyed as `Optimizer.state_dict()` keys it), so a checkpoint is the same file as a DDP or one-process run
writes, and any of the three resumes from it. Exports are plain networks rebuilt from the gathered weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

# Loading: every rank passes the whole state it read from the checkpoint; each keeps its shard.
SCATTER = StateDictOptions(full_state_dict=True)
# Methods besides forward that run a network (FSDP gathers a unit's weights only around registered calls).
FORWARD_METHODS = ("encode", "decode")


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The blocks of `network` that get their own FSDP unit: the items of each first-level ModuleList found
    walking down from the network (not looking inside those items)."""
    units = []
    for child in network.children():
        if isinstance(child, nn.ModuleList):
            units.extend(child)
        else:
            units.extend(shard_units(child))
    return units


def shard(networks: Mapping[str, nn.Module]) -> None:
    """fully_shard each network in place, block by block (inner units first, as FSDP2 requires)."""
    for network in networks.values():
        for unit in shard_units(network):
            fully_shard(unit)
        fully_shard(network)
        for method in FORWARD_METHODS:
            if callable(getattr(network, method, None)):
                register_fsdp_forward_method(network, method)


def fsdp_modules(networks: Iterable[nn.Module]) -> list[FSDPModule]:
    return [n for n in networks if isinstance(n, FSDPModule)]


@contextmanager
def gradient_sync(networks: Sequence[nn.Module], enabled: bool) -> Iterator[None]:
    """Within the block, backward reduce-scatters gradients (enabled) or keeps accumulating whole ones
    locally (a micro-batch before the last of a step; the analogue of DDP's no_sync)."""
    modules = fsdp_modules(networks)
    for module in modules:
        module.set_requires_gradient_sync(enabled, recurse=True)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True, recurse=True)


def gather_model(network: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded network on rank 0 (CPU); {} on the other ranks. Collective.

    As `get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))`
    gives it, in a few bucketed all-gathers instead of one redistribution per tensor (that took 2.7 s of a
    tiny SDXL's 3.7 s checkpoint, 723 tensors; `tests/test_train_fsdp.py` checks both give the same)."""
    state = network.state_dict()
    sharded = [(name, t) for name, t in state.items() if isinstance(t, DTensor)]
    gathered = gather([(t.to_local(), t.shape) for _, t in sharded])
    if gathered is None:
        return {}
    whole = {name: t.detach().cpu().clone() for name, t in state.items() if not isinstance(t, DTensor)}
    whole.update(zip((name for name, _ in sharded), gathered))
    return {name: whole[name] for name in state}  # the state dict's own order


def load_model(network: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a whole state dict (as a checkpoint holds it) into a sharded network: each rank keeps its shard
    (copied into the parameters' own storage, which `Shards` views)."""
    set_model_state_dict(network, dict(state), options=SCATTER)


class Shards:
    """This rank's shards of the sharded parameters as plain tensors that share the parameters' storage
    (`DTensor.to_local()`), by parameter name.

    The optimizer, gradient clipping and the EMA work on these: elementwise maths on a shard is that maths
    on the whole tensor, and plain tensors keep fused AdamW fast (given the DTensors themselves, its first
    step spends ~20 s propagating shardings over a tiny SDXL's 600 tensors, growing with the square of
    their number). Only the clipping norm and whole-tensor gathers need the other ranks.
    """

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.params = dict(params)
        with torch.no_grad():
            self.local = {name: _local(p) for name, p in self.params.items()}

    def pull_grads(self) -> None:
        """Give each shard its parameter's (reduce-scattered, averaged) gradient shard."""
        for name, p in self.params.items():
            self.local[name].grad = None if p.grad is None else _local(p.grad)

    def clear_grads(self) -> None:
        for name, p in self.params.items():
            p.grad = self.local[name].grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """`torch.nn.utils.clip_grad_norm_` over the whole gradients: the 2-norm from each rank's sum of
        squares (one all_reduce), then every shard scaled by min(1, max_norm / (norm + 1e-6))."""
        grads = [t.grad for t in self.local.values() if t.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
        for grad in grads:
            squares += grad.double().pow(2).sum()
        dist.all_reduce(squares)
        norm = float(squares.sqrt())
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            torch._foreach_mul_(grads, scale)
        return norm

    def shard(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a whole tensor laid out as parameter `name` (no communication)."""
        local = self.local[name]
        if not isinstance(self.params[name], DTensor):
            return value
        chunks = list(torch.chunk(value, dist.get_world_size(), dim=0))
        rank = dist.get_rank()
        mine = chunks[rank] if rank < len(chunks) else value.new_empty((0, *value.shape[1:]))
        if mine.shape != local.shape:
            raise RuntimeError(f"{name}: a shard of {tuple(mine.shape)} where the parameter's is {tuple(local.shape)}")
        return mine.to(local.device)

    # --- whole states in, whole states out ------------------------------------------------------------

    def gather(self, tensors: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor] | None:
        """Whole copies of shards laid out as the named parameters' (see `gather`)."""
        return gather([(t, self.params[name].shape) for name, t in tensors])

    def whole_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{parameter name: shard} -> whole tensors on rank 0 ({} elsewhere). Collective."""
        gathered = self.gather(list(tensors.items()))
        return dict(zip(tensors, gathered)) if gathered is not None else {}

    def whole_optimizer(self, state: dict, names: Sequence[str]) -> dict:
        """An `Optimizer.state_dict()` of shards (params by index into `names`) -> the same with whole
        tensors, on rank 0 ({} elsewhere). Per-parameter scalars (Adam's step) stay as they are."""
        keys = [(i, key) for i, values in state["state"].items() for key, v in values.items()
                if v.ndim > 0 and v.shape == self.local[names[i]].shape]
        gathered = self.gather([(names[i], state["state"][i][key]) for i, key in keys])
        if gathered is None:
            return {}
        values = {i: dict(v) for i, v in state["state"].items()}
        for (i, key), tensor in zip(keys, gathered):
            values[i][key] = tensor
        return {"state": values, "param_groups": state["param_groups"]}

    def sharded_optimizer(self, state: dict, names: Sequence[str]) -> dict:
        """A whole (checkpoint's) optimizer state -> this rank's shards, for `Optimizer.load_state_dict`."""
        values = {}
        for i, entry in state["state"].items():
            full = self.params[names[i]].shape
            values[i] = {k: self.shard(names[i], v) if v.ndim > 0 and v.shape == full else v for k, v in entry.items()}
        return {"state": values, "param_groups": state["param_groups"]}


BUCKET = 2**25  # elements per all-gather: bounds the whole copies a rank holds at once


def gather(shards: Sequence[tuple[torch.Tensor, torch.Size]]) -> list[torch.Tensor] | None:
    """Whole copies (CPU) of this rank's shards, each given with its whole shape: a list on rank 0, None on
    the others. Collective; one all_gather per bucket of about `BUCKET` elements, each shard padded to the
    largest shard of its tensor (FSDP's own layout: torch.chunk along dim 0, the last shards may be short
    or empty)."""
    out: list[torch.Tensor] = []
    start = 0
    while start < len(shards):
        stop, size = start, 0
        while stop < len(shards) and (stop == start or size + shards[stop][0].numel() <= BUCKET):
            size += shards[stop][0].numel()
            stop += 1
        out += _gather_bucket(shards[start:stop])
        start = stop
    return out if dist.get_rank() == 0 else None


def _gather_bucket(shards: Sequence[tuple[torch.Tensor, torch.Size]]) -> list[torch.Tensor]:
    world = dist.get_world_size()
    padded, parts = [], []
    for t, full in shards:
        rows = -(-full[0] // world)  # the largest shard's rows
        chunk = t.new_zeros((rows, *full[1:]), dtype=torch.float32)
        chunk[: t.shape[0]] = t
        padded.append(chunk.reshape(-1))
        parts.append((full, rows, t.dtype))
    flat = torch.cat(padded)  # (n,) this rank's shards, padded
    everyone = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(everyone, flat)
    by_rank = everyone.view(world, -1)  # (world, n)
    out, offset = [], 0
    for full, rows, dtype in parts:
        n = rows * math.prod(full[1:])
        pieces = by_rank[:, offset : offset + n].reshape(world * rows, *full[1:])  # the shards in rank order
        out.append(pieces[: full[0]].to(dtype).cpu().clone())
        offset += n
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def plain_copy(network: nn.Module, build, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """An unsharded network holding the whole weights `state`: `build()` makes it on the meta device, the
    tensors are assigned, and buffers no state dict holds (non-persistent ones) are the sharded network's
    own (FSDP shards parameters only)."""
    with torch.device("meta"):
        copy = build()
    copy.load_state_dict(dict(state), strict=True, assign=True)
    buffers = dict(network.named_buffers())
    for name, buffer in copy.named_buffers():
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, buffers[name].detach().clone().cpu(), persistent=False)
    return copy.train(network.training)
