"""Data-parallel training on ``torch.distributed``: the process group, and the few collectives
:func:`pyrovae.fit` needs.

Launch with ``torchrun --nproc_per_node N -m pyrovae train ...``. torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address) for every process;
:func:`init_process_group` reads them and joins the group, with the gloo backend on CPU and NCCL
on GPUs (one device per process, ``cuda:LOCAL_RANK``). Without those variables everything here is a
no-op and a run is a single process.

The semantics are those of ``torch.nn.parallel.DistributedDataParallel``: every process holds the
same model, guide and optimizer state; each step, every process draws the same global minibatch
(the shuffling generator is seeded identically on all ranks), takes its own contiguous slice of it,
computes the gradient of its slice's loss, and the gradients are summed across processes with
weights ``|slice| / |batch|`` before one identical optimizer step everywhere — so the update is the
one a single process would make with the whole global batch (up to floating-point summation
order). Per-datapoint parameters are treated the same way, but only the rows of the global batch
are exchanged (see :mod:`pyrovae.train`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "World",
    "all_gather_objects",
    "all_reduce_sum_",
    "barrier",
    "broadcast_object",
    "broadcast_tensors_",
    "current_world",
    "env_world",
    "init_process_group",
    "rank_seed",
    "run_on_main",
    "shard",
    "shutdown",
]

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics and figures, and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"the environment variable {name}={value!r} is not an integer; it is set by torchrun, "
            "launch with `torchrun --nproc_per_node N -m pyrovae train ...` or unset it"
        ) from None


def env_world() -> World:
    """The world that torchrun's environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    describe (one process when they are not set)."""
    world = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise ValueError(
            f"RANK={world.rank}, WORLD_SIZE={world.world_size} do not describe a process group; let torchrun set them"
        )
    return world


def current_world() -> World:
    """The process group this process belongs to, or a single-process world if none was joined."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


def init_process_group(device: str) -> tuple[World, str]:
    """Join the process group that torchrun set up, if any (idempotent).

    :param device: the requested device, ``"cpu"`` or ``"cuda"``/``"cuda:N"``. Under torchrun a
        CUDA run uses ``cuda:LOCAL_RANK`` in each process, and the NCCL backend; CPU runs use gloo.
    :returns: the world, and the device this process should use.
    """
    world = env_world()
    if not world.is_distributed:
        return world, device
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; run a single process without torchrun")
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= world.local_rank:
            raise ValueError(
                f"process {world.rank} needs cuda:{world.local_rank}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node <= the number of "
                "GPUs, or --device cpu"
            )
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"data-parallel training supports cpu and cuda devices, got {device!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return current_world(), device


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous slice of ``tensor`` along its first dimension (sizes differ by at
    most one between ranks)."""
    if not world.is_distributed:
        return tensor
    return tensor.tensor_split(world.world_size)[world.rank]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s sampling generators: ``seed`` itself on rank 0, and on other ranks
    a seed derived from ``(seed, rank)``, so ranks draw independent noise and no two (seed, rank)
    pairs share a stream the way ``seed + rank`` would."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()


def all_reduce_sum_(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Sum ``tensors`` over all ranks, in place, with one collective per (dtype, device)."""
    if not world.is_distributed:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[(tensor.dtype, tensor.device)].append(tensor)
    for group in groups.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def broadcast_tensors_(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values."""
    if not world.is_distributed:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def broadcast_object(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank (pickled between the processes of this job only)."""
    if not world.is_distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.is_distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T], world: World) -> T:
    """Call ``fn`` on rank 0 only and give its result to every rank; if it raises, every rank
    raises the same error (so a bad checkpoint or output folder stops the whole job cleanly)."""
    if not world.is_distributed:
        return fn()
    outcome: Optional[tuple[bool, Any]] = None
    if world.is_main:
        try:
            outcome = (True, fn())
        except Exception as error:  # re-raised below, on every rank
            outcome = (False, error)
    ok, value = broadcast_object(outcome, world)  # type: ignore[misc]
    if not ok:
        raise value
    return value
