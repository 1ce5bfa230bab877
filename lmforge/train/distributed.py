"""Data parallelism applied from outside the model (torchtitan-style): DDP or FSDP2 (``fully_shard``), on CPU (gloo) or
GPU (nccl).

``torchrun --nproc_per_node N -m lmforge.cli pretrain ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``setup()``
reads them and joins the process group.  A plain ``python -m lmforge.cli pretrain`` (no torchrun) is a world of one and
touches no process group at all, so the single-process path has no distributed code in it.

Data sharding keeps one rule: the *global* batch of step ``s`` is the same function of ``(seed, s)`` as in a single
process, and rank ``r`` trains on rows ``r::world`` of it.  With gradients averaged over ranks, N processes compute the
same update as one process, up to float rounding.

``parallel="fsdp"`` shards every decoder layer, then the root (embeddings, final norm, head), over a 1-D device mesh:
parameters, gradients and optimizer state live as ``DTensor`` shards, so build the optimizer *after* ``parallelize``.
Checkpoints and the final model folder stay in the single-process format: ``full_state_dicts`` gathers unsharded,
FQN-keyed state dicts (a collective under FSDP: every rank calls it, rank 0 receives the tensors) and
``load_full_state_dicts`` shards them back, so a checkpoint written by one process resumes under FSDP and vice versa.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

Parallel = Literal["ddp", "fsdp"]


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


def micro_rows(x: torch.Tensor, world: World, micro: int, grad_accum: int) -> torch.Tensor:
    """This rank's rows of micro-batch ``micro`` (of ``grad_accum``) from one optimizer step's batch: the micro-batch
    is the ``micro``-th contiguous block of ``len(x) / grad_accum`` rows and each rank takes a contiguous share of it.
    So ``W`` processes of ``grad_accum=1`` train each rank on exactly the rows that one process with
    ``grad_accum=W`` (and ``batch_size/W``) puts in each micro-batch: the same per-micro-batch gradients."""
    per_micro = x.size(0) // grad_accum
    if per_micro % world.world_size or x.size(0) % grad_accum:
        raise ValueError(f"{x.size(0)} rows do not split into {grad_accum} micro-batches x {world.world_size} "
                         f"processes")
    share = per_micro // world.world_size
    start = micro * per_micro + world.rank * share
    return x[start:start + share]


def fsdp_param_dtype(world: World, mode: Parallel, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype FSDP all-gathers parameters in: bf16 when training in bf16 on GPUs (it replaces autocast); ``None``
    (fp32 parameters, autocast as in a single process) on CPU, in fp32, or without FSDP."""
    if world.distributed and mode == "fsdp" and world.device.type == "cuda" and dtype == torch.bfloat16:
        return torch.bfloat16
    return None


def parallelize(model: nn.Module, world: World, mode: Parallel = "ddp", param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply data parallelism to ``model`` and return the module to call for the forward pass.

    ``ddp``: a ``DistributedDataParallel`` wrapper.  ``fsdp``: ``fully_shard`` on each of ``model.model.layers`` and
    then on ``model`` itself, in place (the model *is* the module to call; its parameters become ``DTensor`` shards).
    ``param_dtype`` (see ``fsdp_param_dtype``) all-gathers parameters in that dtype and reduces gradients in fp32.
    A single process gets the model back unchanged, whatever the mode.
    """
    if not world.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode != "fsdp":
        raise ValueError(f"parallel: {mode!r} is not one of 'ddp', 'fsdp'")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:  # one all-gather per layer, freed again after its forward
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root group: embeddings, final norm and (tied) head
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce / reduce-scatter) inside the block when ``skip``: DDP's ``no_sync``,
    FSDP's ``set_requires_gradient_sync(False)``; nothing in a single process."""
    if not skip:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def full_model_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded CPU state dict of ``model`` (plain, DDP-trained or FSDP-sharded; a collective under FSDP: every
    rank calls it; in a process group only rank 0 receives the tensors, the others an empty dict).
    ``trainable_only`` leaves out frozen parameters and buffers (a LoRA base)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer,
                     trainable_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state dicts, the optimizer's keyed by parameter name (see ``full_model_state_dict``
    for who receives them)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state_dict(model, trainable_only), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, torch.Tensor],
                          optim_sd: dict[str, Any], strict: bool = True) -> None:
    """Load full state dicts (as ``full_state_dicts`` returns them, given to every rank) into a plain or sharded model
    and its optimizer; each rank keeps its own shards.  ``strict=False`` loads a part (trainable tensors only)."""
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def mean_over_ranks(value: float, world: World) -> float:
    """The average of a Python float over all ranks (the value itself in a single process)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.world_size


def sum_over_ranks(values: list[float], world: World) -> list[float]:
    """Element-wise sums of Python floats over all ranks (the values themselves in a single process)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


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
