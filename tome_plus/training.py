"""Pieces the trainers share (ATP's modules, DiffRate's rates)."""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

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
