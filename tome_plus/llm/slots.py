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

The book is an attribute of the cache (its class stays the one `generate` or the user made);
its first layer's class is swapped once (`booked_class`), so that `generate`'s beam search,
repeats, row selection, cropping (assisted decoding: the rejected candidates are the last
decoded tokens, one slot per row in every segment) and reset reach the book.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from transformers.cache_utils import (Cache, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer, StaticLayer,
                                      StaticSlidingWindowLayer)


BOOK_ATTR = "_tome_plus_book"


@dataclass
class SlotBook:
    """Per segment `[B, S]`: which cached slots are real, and their column in the conversation
    (-1: padding); with `positions="packed"` (`[B]`), how far each row's positions moved back."""

    valid: List[torch.Tensor] = field(default_factory=list)
    column: List[torch.Tensor] = field(default_factory=list)
    shift: Optional[torch.Tensor] = None
    # positions="packed" at site="llm": per segment after a site, `[B]` how far that site moved
    # each row's later positions back
    site_shift: Dict[int, torch.Tensor] = field(default_factory=dict)
    # the conversation's length in columns after the last forward (the cache holds fewer slots where
    # a site pruned): a forward without an attention mask (generate drops an all-ones one) counts
    # its columns from it
    length: Optional[int] = None

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.valid = [fn(t) for t in self.valid]
        self.column = [fn(t) for t in self.column]
        if self.shift is not None:
            self.shift = fn(self.shift)
        self.site_shift = {k: fn(t) for k, t in self.site_shift.items()}

    def drop_last(self, k: int) -> None:
        """Forget the last `k` tokens of the conversation (assisted decoding's rejected
        candidates): the last `k` slots of every segment, which must be whole decoding columns
        (every row real, the same conversation column); else refused."""
        for valid, column in zip(self.valid, self.column):
            last = column[:, -k:]
            if valid.shape[1] < k or not bool(valid[:, -k:].all()) or not bool((last == last[:1]).all()):
                raise ValueError("tome_plus: cropping this cache would cut into a forward that pruned (each row "
                                 "keeps its own slots there); crop only tokens decoded since")
        self.valid = [t[:, :-k] for t in self.valid]
        self.column = [t[:, :-k] for t in self.column]
        if self.length is not None:
            self.length -= k

    def clear(self) -> None:
        self.valid, self.column, self.shift, self.site_shift, self.length = [], [], None, {}, None


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
        if isinstance(layer, LinearAttentionLayer) and not isinstance(layer, (DynamicLayer, StaticLayer)):
            continue  # Qwen3.5's recurrent state: nothing per slot (what reduces there is checked at `patch`)
        if isinstance(layer, (DynamicSlidingWindowLayer, StaticSlidingWindowLayer)) or not isinstance(
                layer, (DynamicLayer, StaticLayer)):
            raise refuse(f"a {type(cache).__name__} with {type(layer).__name__} layers")


def keep_every_slot(cache: Optional[Cache]) -> None:
    """An empty cache's sliding-window layers (Gemma 3's) become appending ones: their window is in
    the loop's masks (`segments.segment_mask`), and the book needs every layer to hold the slots
    it kept. A layer that holds tokens already stays (`check_cache` refuses it)."""
    if cache is None:
        return
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicSlidingWindowLayer and not layer.is_initialized:
            cache.layers[i] = DynamicLayer()


def book_of(cache: Optional[Cache]) -> Optional[SlotBook]:
    return getattr(cache, BOOK_ATTR, None) if cache is not None else None


def open_book(cache: Cache) -> SlotBook:
    """The cache's book, made on first use (an attribute: the cache keeps its class)."""
    book = book_of(cache)
    if book is None:
        book = SlotBook()
        setattr(cache, BOOK_ATTR, book)
    return book


def hook_book(cache: Cache) -> None:
    """After a forward (a dynamic cache makes its layers then): the first layer carries the
    book's hooks (`booked_class`), so the cache's reorder, repeat, selection, crop and reset
    reach the book through HF's own loop over the layers."""
    book = book_of(cache)
    if book is None or not cache.layers:
        return
    first = cache.layers[0]
    first.__class__ = booked_class(type(first))
    first.__dict__[BOOK_ATTR] = book


def keep_hooks(layer, cls: type) -> type:
    """`cls`, or its booked kind where `layer` carries the book's hooks (`booked_class`): for
    code that turns a cache layer into another class (a KV policy's `PrunedLayer`)."""
    return booked_class(cls) if getattr(layer, "_tome_plus_booked", False) else cls


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


_BOOKED: Dict[type, type] = {}


def booked_class(cls: type) -> type:
    """`cls` (a cache layer class) with the book's hooks, made once per class. A direct subclass
    (a mixin beside HF's layer classes would change their layout, which `__class__` assignment
    refuses); each hook calls `cls`'s own method, then applies the same to the book."""
    if getattr(cls, "_tome_plus_booked", False):
        return cls
    if cls not in _BOOKED:
        def book(self) -> Optional[SlotBook]:
            return self.__dict__.get(BOOK_ATTR)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            cls.reorder_cache(self, beam_idx)
            if book(self) is not None:
                book(self).apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            cls.batch_repeat_interleave(self, repeats)
            if book(self) is not None:
                book(self).apply(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            cls.batch_select_indices(self, indices)
            if book(self) is not None:
                book(self).apply(lambda t: t[indices.to(t.device)])

        def crop(self, tokens_to_remove: int) -> None:
            if book(self) is not None and book(self).valid and tokens_to_remove < 0:
                book(self).drop_last(-tokens_to_remove)
            cls.crop(self, tokens_to_remove)

        def reset(self) -> None:
            cls.reset(self)
            if book(self) is not None:
                book(self).clear()

        _BOOKED[cls] = type(f"TomePlus{cls.__name__}", (cls,), dict(
            _tome_plus_booked=True, __module__=__name__, __doc__=f"{cls.__name__} carrying a cache's `SlotBook`.",
            reorder_cache=reorder_cache, batch_repeat_interleave=batch_repeat_interleave,
            batch_select_indices=batch_select_indices, crop=crop, reset=reset))
    return _BOOKED[cls]
