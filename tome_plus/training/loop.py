"""The pieces of a training loop every trainer shares: endless batches, one optimizer step with
averaged gradients, the progress bar, when a checkpoint is due."""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
from tqdm import tqdm

from .distributed import average_gradients

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


def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Gradients of `loss` (the optimizer's gradients zeroed in place first)."""
    optimizer.zero_grad(set_to_none=False)
    loss.backward()


def step(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of `params` over the processes and take the optimizer's step."""
    average_gradients(params)
    optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def steps_bar(start: int, steps: int, desc: str, show: bool, **kwargs) -> tqdm:
    """The steps `start .. steps - 1` with a progress bar (shown only when `show`: rank 0, asked for)."""
    return tqdm(range(start, steps), disable=not show, desc=desc, unit="step", **kwargs)


def due(done: int, every: int, steps: int) -> bool:
    """Whether a checkpoint is due after `done` steps: every `every` steps and at the end."""
    return done % every == 0 or done == steps
