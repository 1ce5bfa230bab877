"""Data parallelism applied from outside the model (torchtitan-style): DDP on CPU (gloo) or GPU (nccl).

``torchrun --nproc_per_node N -m lmforge.cli pretrain ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``setup()``
reads them and joins the process group.  A plain ``python -m lmforge.cli pretrain`` (no torchrun) is a world of one and
touches no process group at all, so the single-process path has no distributed code in it.

Data sharding keeps one rule: the *global* batch of step ``s`` is the same function of ``(seed, s)`` as in a single
process, and rank ``r`` trains on rows ``r::world`` of it.  With gradients averaged over ranks, N processes compute the
same update as one process, up to float rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> World:
    """Join the process group torchrun described in the environment (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return World(rank, world_size, local_rank, dev)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(x: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's rows ``rank::world_size`` of a global batch (the batch size must divide evenly)."""
    if x.size(0) % world.world_size:
        raise ValueError(f"batch_size {x.size(0)} is not a multiple of the {world.world_size} processes; "
                         f"pick a batch_size divisible by --nproc_per_node")
    return x[world.rank::world.world_size]


def parallelize(model: nn.Module, world: World) -> nn.Module:
    """Wrap ``model`` for data parallelism (DDP); a single process gets the model back unchanged."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def mean_over_ranks(value: float, world: World) -> float:
    """The average of a Python float over all ranks (the value itself in a single process)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.world_size


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
