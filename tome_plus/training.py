"""Pieces the trainers share (ATP's modules, DiffRate's rates, the CLCA head)."""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

T = TypeVar("T")


def cycle(batches: Iterable[T]) -> Iterator[T]:
    """Go through `batches` again and again (an iterable that can be iterated more than once, or a
    generator that never ends); an empty one is an error rather than a silent hang."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the batches are empty")


def distributed_world() -> int:
    """Processes in this `torch.distributed` job (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_first(module: nn.Module) -> None:
    """Every process takes process 0's parameters and buffers (no shared file system needed)."""
    if distributed_world() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each gradient by its mean over the processes, so every process takes the same step."""
    world = distributed_world()
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
