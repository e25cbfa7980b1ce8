"""`torch.distributed` helpers every trainer shares (ATP's modules, DiffRate's rates, the
fine-tuned head or model): joining a `torchrun` job, rank 0's weights to every rank, averaged
gradients and buffers, one start step for all."""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


def distributed_world() -> int:
    """Processes in this `torch.distributed` job (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the `torch.distributed` job (0 when there is none)."""
    return dist.get_rank() if distributed_world() > 1 else 0


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


def average_buffers(module: nn.Module) -> None:
    """Replace each floating buffer (BatchNorm's running statistics, which every process gathers from
    its own batches) by its mean over the processes, so that the processes hold the same module."""
    world = distributed_world()
    if world > 1:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= world


def same_start(start: int, message: str, device=None) -> None:
    """Every rank must go on from the same step, or the gradient exchange deadlocks: ValueError
    `message.format(low=..., high=...)` when the ranks read different start steps."""
    if distributed_world() > 1:
        steps = torch.tensor([start, -start], dtype=torch.int64, device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise ValueError(message.format(low=int(-steps[1]), high=int(steps[0])))


_HELD = False  # a caller holds the process group across several runs (`held_process_group`)


def setup_distributed(device: str) -> Tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under `torchrun` joins the process group
    (NCCL on CUDA, gloo on CPU; the one already held, if any) and takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    rank_, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    return rank_, world, dev


def teardown_distributed(world: int) -> None:
    if world > 1 and dist.is_initialized() and not _HELD:
        dist.destroy_process_group()


@contextlib.contextmanager
def held_process_group(device: str) -> Iterator[Tuple[int, int, torch.device]]:
    """Under `torchrun`, one process group for everything in the block (a sweep's runs: joining
    and leaving for each would race the processes that run ahead); a no-op in one process."""
    global _HELD
    rank_, world, dev = setup_distributed(device)
    outer, _HELD = _HELD, _HELD or world > 1  # nested: the outermost block leaves the group
    try:
        yield rank_, world, dev
    finally:
        _HELD = outer
        teardown_distributed(world)
