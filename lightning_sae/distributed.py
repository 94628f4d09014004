"""Collectives over the default process group, and their one-process fallbacks.

Lightning's DDP and ModelParallel strategies initialise ``torch.distributed``; every rank must reach
each call on the same step. Without an initialised process group each function returns its input,
so code that uses them runs unchanged in one process (tests, notebooks).
"""

import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Return the number of processes in the default group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is not modified)."""
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over ranks, computed in the tensor's dtype (float64 stays float64)."""
    size = world_size()
    return tensor if size == 1 else all_reduce_sum(tensor) / size


def all_reduce_min(tensor: Tensor) -> Tensor:
    """Element-wise minimum of ``tensor`` over ranks (a new tensor; the input is not modified)."""
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def broadcast_from_first(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``tensor`` of the first rank of ``group``, on every rank of it (a new tensor)."""
    out = tensor.contiguous().clone()
    dist.broadcast(out, group=group, group_src=0)
    return out
