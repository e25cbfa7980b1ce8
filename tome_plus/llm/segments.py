"""The tokens of a patched language model between two pruning sites, and the masks its layers
attend with there.

A `Segment` is the current tokens of one stretch of layers: every row padded on the left to the
batch's largest count, each slot with its input position, position id and rotary angles (M-RoPE
rows included), and the masks of visual / instruction / prompt tokens. `compact` drops the slots a
site rejects (the survivors gathered to the right, so every row's last token stays last);
`scatter_back` puts hidden states back at the input's positions. After a site every later layer
attends with a mask of its own (padding slots as keys never, causal by slot order, which is
position order), built in the form the attention backend takes (`layer_mask`, `segment_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, eager_mask,
                                        flash_attention_mask, flex_attention_mask, sdpa_mask)

if TYPE_CHECKING:
    from .slots import SegmentKeys


@dataclass
class Segment:
    """The current tokens of one stretch of layers (all rows padded to the same count K)."""

    index: torch.Tensor  # [B, K] input position of each slot
    valid: torch.Tensor  # [B, K] bool: a real token (not padding)
    positions: torch.Tensor  # [B, K] position ids
    cos: torch.Tensor  # [B, K, D] rotary angles
    sin: torch.Tensor
    visual: torch.Tensor  # [B, K] bool
    spatial: torch.Tensor  # [B, K] float
    instruction: torch.Tensor  # [B, K] bool: text after the image
    prompt: torch.Tensor  # [B, K] bool: the prompt's real tokens (FastV's queries)
    key_bias: Optional[torch.Tensor] = None  # [B, K] log soft mask (training)
    # [B, K] each slot's image block (-1: none) where an image's tokens attend each other both ways
    # (Gemma 3); the kept tokens of a block still do after a site
    groups: Optional[torch.Tensor] = None
    # known on the host: every slot is a real token (no row padded; `compact` learns it with the count
    # it reads anyway), so an SDPA layer over this segment's slots alone is plain causal attention
    dense: bool = False


def mask_builder(backend: str) -> Callable:
    """HF's mask function for `backend`, one of the four forms the masks built here after a pruning
    site take: eager's additive 4-D, SDPA's bool 4-D, flex attention's BlockMask, flash
    attention's 2-D padding mask."""
    builder = eager_mask if backend == "eager" else ALL_MASK_ATTENTION_FUNCTIONS.get(backend)
    if builder not in (eager_mask, sdpa_mask, flex_attention_mask, flash_attention_mask):
        raise ValueError(f"attention backend {backend!r} takes a mask tome_plus does not know how to build after a "
                         f"pruning site; use eager, sdpa, flex_attention or a flash_attention_* backend")
    return builder


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as an additive one: 0 where it is True, the dtype's minimum where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def layer_mask(keys: "SegmentKeys", seg: Segment, dtype: torch.dtype, backend: str, window: Optional[int] = None):
    """A segment's mask in the form `backend`'s layers take, over its keys (`slots.SegmentKeys`).
    Flash and flex attention get HF's own (a padding mask over the real slots, causal from the
    right: the same attention, since slot order is position order); eager and SDPA
    `segment_mask`, whose padding rows see themselves (an SDPA row with no key gives NaN, which
    would reach real rows through the values). SDPA over a prefill's own slots with no padding
    (`Segment.dense`: a batch of one, or rows that kept as many) gets None: its causal kernel, as
    HF's unpadded prefill."""
    builder = mask_builder(backend)
    if (builder is sdpa_mask and seg.dense and isinstance(keys.first, int) and keys.first == 0 and window is None
            and seg.groups is None and seg.key_bias is None and keys.valid.shape[1] == seg.valid.shape[1]):
        return None  # a prefill's own slots, none padding: SDPA's causal kernel, no mask to read
    if seg.key_bias is not None and builder not in (eager_mask, sdpa_mask):
        raise ValueError(f"ATP's soft masks (training) need a 4-D float attention mask, which {backend} does not "
                         f"take: train with attn_implementation='sdpa' or 'eager'")
    if builder in (flex_attention_mask, flash_attention_mask):
        if seg.groups is not None or window is not None:  # refused at `patch` (`decoders.explicit_masks`)
            raise ValueError(f"the {backend} backend's mask cannot say attention both ways within an image or a "
                             f"sliding window here: load the model with attn_implementation='sdpa' or 'eager'")
        batch, k = seg.valid.shape
        return builder(batch_size=batch, q_length=k, kv_length=keys.valid.shape[1], q_offset=keys.first,
                       mask_function=causal_mask_function, attention_mask=keys.valid, device=keys.valid.device)
    mask = segment_mask(keys, seg, dtype, window)
    return additive(mask, dtype) if builder is eager_mask and mask.dtype == torch.bool else mask


def segment_mask(keys: "SegmentKeys", seg: Segment, dtype: torch.dtype, window: Optional[int] = None
                 ) -> torch.Tensor:
    """`[B, 1, K, Lk]` mask of a segment's K new slots over its keys: real keys up to the query's
    own slot (`keys.first + q`: causal by slot order), each slot always seeing itself (padding
    rows stay finite); float with the soft masks' log on the keys.

    With `seg.groups` (Gemma 3), a slot also sees the later slots of its own image block; with a
    `window`, a query sees no key `window` or more conversation columns before its own (HF's
    sliding layers: the window bounds the look-back only, so a block's later slots stay)."""
    batch, k = seg.valid.shape
    length = keys.valid.shape[1]
    own = keys.first + torch.arange(k, device=keys.valid.device)
    column = torch.arange(length, device=keys.valid.device)
    causal = column.unsqueeze(0) <= own.unsqueeze(1)
    mask = keys.valid.unsqueeze(1) & causal.unsqueeze(0)
    if seg.groups is not None:  # this forward's slots are keys first .. first + k (an appending cache)
        g = seg.groups
        same = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)
        block = torch.nn.functional.pad(same, (keys.first, length - keys.first - k))
        mask = mask | (block & keys.valid.unsqueeze(1))
    if window is not None:
        query = keys.column[:, keys.first:keys.first + k]
        mask = mask & (query[:, :, None] - keys.column[:, None, :] < window)
    mask = (mask | (column.unsqueeze(0) == own.unsqueeze(1)).unsqueeze(0)).unsqueeze(1)
    if seg.key_bias is None:
        return mask
    bias = torch.cat([seg.key_bias.new_zeros(batch, length - k), seg.key_bias], dim=1)
    return additive(mask, dtype) + bias.to(dtype)[:, None, None, :]


def compact(h: torch.Tensor, seg: Segment, keep: torch.Tensor, key: Optional[torch.Tensor] = None):
    """Drop the slots `keep` ([B, K] bool) rejects; survivors move right in order (or in the
    order of `key`, `[B, K]` distinct per row), rows padded on the left to the largest count."""
    counts = keep.sum(dim=1)
    # one read of the host: the count, and whether every row's kept slots are all real tokens
    n, fewest_real = torch.stack([counts.max(), (keep & seg.valid).sum(dim=1).min()]).tolist()
    # stable sort by keep: dropped slots first, kept last, each in order; the last n are the
    # row's kept slots behind (n - count) dropped ones, which become padding
    if key is None:
        order = keep.long().argsort(dim=1, stable=True)[:, -n:]
    else:
        order = torch.where(keep, key, torch.full_like(key, -1)).argsort(dim=1, stable=True)[:, -n:]
    occupied = torch.arange(n, device=h.device).unsqueeze(0) >= (n - counts).unsqueeze(1)
    take = lambda t: t.gather(1, order if t.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    seg = Segment(index=take(seg.index), valid=take(seg.valid) & occupied, positions=take(seg.positions),
                  cos=take(seg.cos), sin=take(seg.sin), visual=take(seg.visual) & occupied,
                  spatial=take(seg.spatial), instruction=take(seg.instruction) & occupied,
                  prompt=take(seg.prompt) & occupied,
                  key_bias=None if seg.key_bias is None else take(seg.key_bias),
                  groups=None if seg.groups is None else torch.where(occupied, take(seg.groups), -1),
                  dense=fewest_real == n)
    return take(h), seg


def scatter_back(h: torch.Tensor, seg: Segment, n: int) -> torch.Tensor:
    """`[B, n, D]` hidden states at the input's positions (zeros where a token was pruned)."""
    out = h.new_zeros(h.shape[0], n, h.shape[-1])
    return out.scatter(1, seg.index.unsqueeze(-1).expand_as(h), h)


def instruction_after_image(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Text tokens after the first image token of their row (the instruction)."""
    seen = visual.long().cumsum(dim=1) > 0
    return seen & ~visual & valid
