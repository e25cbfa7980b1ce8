"""Which slots of a patched language model's KV cache are real, per segment (`SlotBook`), kept on
the cache itself so that it travels with `generate`, and the keys a segment's layers attend over
in one forward (`SegmentKeys`).

After a pruning site each row keeps its own tokens, so the layers of one segment (the stretch
between two sites) cache fewer slots than the conversation, some of them padding. The book holds
per segment `[B, S]` which slots are real and each slot's column in the conversation (for
`output_attentions` at the input's positions). Two kinds of cache layer hold the slots:

- appending layers (`DynamicLayer` and its quantized and offloaded kinds): a forward's keys are
  the cached slots followed by its new ones; the book grows with them;
- static layers (`StaticLayer`, `cache_implementation="static"`, what `torch.compile`d
  `generate` runs): a fixed buffer of `max_cache_len` slots that each layer fills from its own
  `cumulative_length`; the book is as long as the buffer and a forward writes its slots in place,
  so nothing changes shape between decoding steps.

The cache's class is swapped once (`BookedCache`) so that `generate`'s beam search, repeats and
row selection reorder the book with the layers. Cropping (assisted decoding) is refused: the
segments hold different numbers of slots per row, which a crop by conversation length does not
describe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from ..backends.base import patched_class

BOOK_ATTR = "_tome_plus_book"


@dataclass
class SlotBook:
    """Per segment `[B, S]`: which cached slots are real, and their column in the conversation
    (-1: padding); with `positions="packed"` (`[B]`), how far each row's positions moved back."""

    valid: List[torch.Tensor] = field(default_factory=list)
    column: List[torch.Tensor] = field(default_factory=list)
    shift: Optional[torch.Tensor] = None

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.valid = [fn(t) for t in self.valid]
        self.column = [fn(t) for t in self.column]
        if self.shift is not None:
            self.shift = fn(self.shift)


@dataclass
class SegmentKeys:
    """The keys one segment's layers attend over in this forward: `[B, Lk]` which are real, the
    slot of the first new token (an int, or a 0-d tensor for a static layer: no host sync), and
    each key's column in the conversation (`[B, Lk]`, -1: padding)."""

    valid: torch.Tensor
    first: Union[int, torch.Tensor]
    column: torch.Tensor


def is_static(cache: Optional[Cache]) -> bool:
    """Whether the cache's layers are fixed buffers (`StaticLayer`) rather than appending."""
    return cache is not None and bool(cache.layers) and isinstance(cache.layers[0], StaticLayer)


def check_cache(cache: Optional[Cache], refuse: Callable[[str], Exception]) -> None:
    """Refuse a cache whose layers are neither appending nor static full-attention buffers."""
    if cache is None:
        return
    for layer in cache.layers:
        if isinstance(layer, (DynamicSlidingWindowLayer, StaticSlidingWindowLayer)) or not isinstance(
                layer, (DynamicLayer, StaticLayer)):
            raise refuse(f"a {type(cache).__name__} with {type(layer).__name__} layers")


def book_of(cache: Optional[Cache]) -> Optional[SlotBook]:
    return getattr(cache, BOOK_ATTR, None) if cache is not None else None


def open_book(cache: Cache) -> SlotBook:
    """The cache's book, made (and the cache's class swapped to `BookedCache`) on first use."""
    book = book_of(cache)
    if book is None:
        book = SlotBook()
        if not isinstance(cache, BookedCache):
            cache.__class__ = patched_class(BookedCache, type(cache))
        setattr(cache, BOOK_ATTR, book)
    return book


def segment_keys(cache: Optional[Cache], book: Optional[SlotBook], segment: int, layer: int, valid: torch.Tensor,
                 index: torch.Tensor, prior: torch.Tensor) -> SegmentKeys:
    """The keys of book segment `segment` (its first layer: `layer`) in this forward, with its new
    slots (`valid`, `index`: `[B, K]` real, and input position), the book extended by them.

    `prior`: `[B, P]` the conversation's real tokens before this forward, which a segment the book
    does not hold yet has cached whole (forwards that pruned nothing filled it); new token i is at
    conversation column `P + i`."""
    past = prior.shape[1]
    column = torch.where(valid, index + past, torch.full_like(index, -1))
    fresh = book is None or len(book.valid) <= segment
    if fresh:
        before = torch.arange(past, device=valid.device).expand(valid.shape[0], past)
        prior_column = torch.where(prior, before, torch.full_like(before, -1))
    if is_static(cache):
        buffer = cache.layers[layer]
        first = buffer.cumulative_length.to(valid.device) if buffer.is_initialized else past
        if fresh:
            length = buffer.max_cache_len
            pad = (0, length - past)
            book.valid.append(torch.nn.functional.pad(prior, pad))
            book.column.append(torch.nn.functional.pad(prior_column, pad, value=-1))
        slots = first + torch.arange(valid.shape[1], device=valid.device)
        book.valid[segment].index_copy_(1, slots, valid)
        book.column[segment].index_copy_(1, slots, column)
        return SegmentKeys(book.valid[segment], first, book.column[segment])
    if fresh:
        keys = SegmentKeys(torch.cat([prior, valid], dim=1), past, torch.cat([prior_column, column], dim=1))
        if book is not None:
            book.valid.append(keys.valid)
            book.column.append(keys.column)
        return keys
    keys = SegmentKeys(torch.cat([book.valid[segment], valid], dim=1), book.valid[segment].shape[1],
                       torch.cat([book.column[segment], column], dim=1))
    book.valid[segment], book.column[segment] = keys.valid, keys.column
    return keys


def conversation_keys(cache: Optional[Cache], full: torch.Tensor, n: int) -> SegmentKeys:
    """The keys of the layers before the first pruning site (every token of the conversation:
    `full`, `[B, P + n]` its real tokens), as `segment_keys` gives a segment's."""
    batch, width = full.shape
    if is_static(cache):
        length = cache.layers[0].max_cache_len
        return SegmentKeys(torch.nn.functional.pad(full, (0, length - width)), width - n,
                           torch.arange(length, device=full.device).expand(batch, length))
    return SegmentKeys(full, width - n, torch.arange(width, device=full.device).expand(batch, width))


class BookedCache:
    """Mixin for a cache that holds a `SlotBook`: the book follows the rows when `generate`
    reorders (beam search), repeats or selects them, and is dropped with the contents on `reset`."""

    def _book_apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        book = book_of(self)
        if book is not None:
            book.apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._book_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._book_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._book_apply(lambda t: t[indices.to(t.device)])

    def crop(self, max_length: int) -> None:
        if book_of(self) is not None and book_of(self).valid:
            raise ValueError("tome_plus: this cache's layers after a pruning site hold a different set of tokens per "
                             "row, which cropping it to a conversation length does not describe (assisted and "
                             "prompt-lookup decoding crop the cache): generate without an assistant")
        super().crop(max_length)

    def reset(self) -> None:
        super().reset()
        self.__dict__.pop(BOOK_ATTR, None)
