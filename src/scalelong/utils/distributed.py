"""The little of torch.distributed that evaluation needs, all of it a no-op in a single process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_device(default: torch.device | str = "cpu") -> torch.device:
    """Where tensors must live to be all-reduced: the current CUDA device for NCCL, else ``default``."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(default)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place where possible); returns the summed tensor on t's device."""
    if not is_distributed():
        return t
    dev = reduce_device(t.device)
    work = t if t.device == dev else t.to(dev)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work if work is t else work.to(t.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (for example a download into a shared cache), then the others."""
    rank, _ = rank_and_world()
    if rank != 0:
        barrier()
    try:
        yield
    finally:
        if rank == 0:
            barrier()
