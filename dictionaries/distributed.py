"""Data parallelism for dictionary training under ``torchrun`` (gloo on CPU, nccl on GPU).

Every rank reads the same deterministic activation chunks and trains on its own rows of each
batch (rows ``rank::world``); gradients are averaged and the "fired" masks OR-ed across ranks
after every step, so all ranks hold identical dictionaries, equal (up to floating-point
reduction order) to a single-process run with the same global batch. Rank 0 alone writes
checkpoints and results.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def maybe_init(device: str = "cpu") -> None:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and not yet joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files (rank 0)."""
    return world()[0] == 0


def shard_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch (``rank::world``)."""
    rank, size = world()
    return t if size == 1 else t[rank::size]


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce (mean) the gradients of ``module``'s parameters."""
    _, size = world()
    if size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(size)


def any_across_ranks(mask: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a bool tensor over ranks."""
    if world()[1] == 1:
        return mask
    m = mask.to(torch.uint8)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.bool()


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if world()[1] > 1:
        dist.barrier()


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over ranks (the tensor itself outside a process group)."""
    if world()[1] == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def sum_float(x: float) -> float:
    """Sum of a Python number over ranks, computed in float64."""
    if world()[1] == 1:
        return x
    return float(sum_across_ranks(torch.tensor([x], dtype=torch.float64))[0])
