"""CLCA: cross-layer cache (CLC) and cross-layer aggregation head (CLA).

Rios et al., "Cross-Layer Cache Aggregation for Token Reduction in Ultra-Fine-Grained Image
Recognition", ICASSP 2025 (arXiv:2501.00243); docs/methods.md, CLCA head. Implements:
- CLC: a learnable carrier token, initialised from the class token, rides with the tokens. After
  every block before the last append the cache takes the mean of the reducible tokens (the GAP
  token) and the carrier's state; after each reduction block, and after block depth - 2, the
  tokens cached by the blocks before it join the sequence with size 1 and the cache empties (so
  with reductions after blocks 3, 6 and 9 of 12: blocks 0-2, 3-5, 6-8 and 9 are appended after
  blocks 3, 6, 9 and 10, as in the authors' code). Later attention reads them.
- CLA: the class token after each reduction block and after the last block, stacked `[B, C, K]`,
  then BatchNorm, depth-wise Conv1d (C -> 2C, kernel K, groups C), BatchNorm, GELU and a
  point-wise Conv1d to the classes. It replaces the model's final norm and head.

Where the authors' code (arkel23/CLCA) leaves a choice open, the defaults follow it: the GAP token
is cached and the extra append at depth - 2 happens; appended tokens are ordinary tokens that later
reduction layers may merge or prune (`protect_cached=True` keeps them instead). One deliberate
difference: the authors' carrier is "the last token of the sequence", which their reducers may
merge or prune and which, after an append, is a cached copy; here the carrier is a protected token
(after the class, distillation and register tokens), so its state is defined under every reducer.
Attention does not see positions, so where it sits changes nothing else. The GAP token averages
every reducible token (theirs, the span between the class token and the appended ones: once merges
reorder the tokens the two cannot be told apart). `cache=False` leaves the aggregation head alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from ..methods.base import is_int
from ..state import TokenState, insert_tokens


@dataclass
class ClcaConfig:
    """Options of the CLCA head (`tome_plus.patch(..., head="clca", head_options={...})`).

    Attributes:
        num_classes: classes of the aggregation head; None takes the model's (`model.num_classes`,
            which must then be > 0).
        layers: the reduction blocks (0-based) after which cached tokens are appended and whose
            class token the head aggregates; None: the blocks that reduce at the model's default
            input size.
        cache: the cross-layer cache (carrier and cached tokens); False leaves the aggregation
            head alone (CLA without CLC, the paper's ablation).
        recover_at_last: also append the cache after block depth - 2 (the authors' default).
        cache_gap: cache the mean of the reducible tokens as well as the carrier (the authors' default).
        protect_cached: appended tokens join the protected prefix instead of the reducible tokens
            (the authors' code lets later reduction layers merge or prune them).
        expansion: channels per input channel of the depth-wise convolution (2: C -> 2C).
        weights: a file `tome_plus.heads.save` wrote, loaded at `patch`.
    """

    num_classes: Optional[int] = None
    layers: Optional[Sequence[int]] = None
    cache: bool = True
    recover_at_last: bool = True
    cache_gap: bool = True
    protect_cached: bool = False
    expansion: int = 2
    weights: Optional[str] = None

    def __post_init__(self) -> None:
        if self.num_classes is not None and (not is_int(self.num_classes) or self.num_classes < 1):
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(is_int(v) for v in self.layers):
                raise ValueError(f"layers must be a list of block indices, got {self.layers!r}")
            self.layers = sorted({int(v) for v in self.layers})
        for name in ("cache", "recover_at_last", "cache_gap", "protect_cached"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.expansion) or self.expansion < 1:
            raise ValueError(f"expansion must be a positive int, got {self.expansion!r}")


def schedule(config: ClcaConfig, reducing: Sequence[int], depth: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(blocks after which the cache is appended, blocks whose class token the head stacks)."""
    layers = list(config.layers) if config.layers is not None else list(reducing)
    bad = [v for v in layers if not 0 <= v < depth]
    if bad:
        raise ValueError(f"layers {bad} are not blocks of this {depth}-block model")
    append = set(v for v in layers if v < depth - 1)  # nothing runs after the last block
    if config.recover_at_last and depth >= 2:
        append.add(depth - 2)
    if not config.cache:
        append = set()
    collect = set(layers) | {depth - 1}
    return tuple(sorted(append)), tuple(sorted(collect))


class ClcaHead(nn.Module):
    """The trainable part: the carrier token (when caching) and the aggregation head.

    Args:
        dim: the model's width C.
        num_classes: output classes.
        append_at, collect_at: from `schedule` (K = len(collect_at)).
        carrier: `[C]` initial carrier (the model's class token as it enters the first block);
            None: no cross-layer cache.
        cache_gap, protect_cached, expansion: as `ClcaConfig`.
    """

    config_class: ClassVar[Type[ClcaConfig]] = ClcaConfig  # its options, checked by `heads.REGISTRY`

    def __init__(self, dim: int, num_classes: int, append_at: Sequence[int], collect_at: Sequence[int],
                 carrier: Optional[torch.Tensor], cache_gap: bool = True, protect_cached: bool = False,
                 expansion: int = 2) -> None:
        super().__init__()
        self.append_at, self.collect_at = tuple(append_at), tuple(collect_at)
        self.cache_gap, self.protect_cached = cache_gap, protect_cached
        self.carrier = nn.Parameter(carrier.detach().clone().reshape(1, 1, dim)) if carrier is not None else None
        k, wide = len(self.collect_at), expansion * dim
        self.aggregate = nn.Sequential(
            nn.BatchNorm1d(dim),
            nn.Conv1d(dim, wide, kernel_size=k, groups=dim),
            nn.BatchNorm1d(wide),
            nn.GELU(),
        )
        self.classifier = nn.Conv1d(wide, num_classes, kernel_size=1)

    @classmethod
    def build(cls, model: nn.Module, config: ClcaConfig, reducing: Sequence[int], depth: int) -> ClcaHead:
        """A fresh CLCA head for a timm VisionTransformer `model`."""
        if getattr(model, "cls_token", None) is None:
            raise ValueError(f"the CLCA head aggregates the class token; {type(model).__name__} has none")
        num_classes = config.num_classes if config.num_classes is not None else model.num_classes
        if not num_classes:
            raise ValueError("the model has no classifier (num_classes=0): give head_options={'num_classes': N}")
        append_at, collect_at = schedule(config, reducing, depth)
        carrier = model.cls_token.detach().reshape(-1)
        pos = getattr(model, "pos_embed", None)
        if pos is not None and not getattr(model, "no_embed_class", False):
            carrier = carrier + pos.detach()[0, 0]
        with torch.no_grad():  # the class token as it enters the blocks (after a CLIP-style pre-norm)
            carrier = model.norm_pre(carrier)
        head = cls(model.embed_dim, num_classes, append_at, collect_at, carrier if config.cache else None,
                   config.cache_gap, config.protect_cached, config.expansion)
        return head.to(device=model.cls_token.device, dtype=model.cls_token.dtype)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def start(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        """Put the carrier after the protected prefix and start this forward's cache."""
        at = state.n_prefix
        if self.carrier is None:  # the aggregation head alone
            return x, state.replace(head=ClcaRun(self, carrier_at=-1))
        x, state = insert_tokens(x, state, at, [self.carrier.expand(x.shape[0], -1, -1)], protect=True)
        return x, state.replace(head=ClcaRun(self, carrier_at=at))

    def logits(self, collected: Sequence[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """The stacked class tokens `K x [B, C]` -> `[B, classes]` (`pre_logits`: `[B, expansion C]`)."""
        if len(collected) != len(self.collect_at):
            raise ValueError(f"the CLCA head aggregates {len(self.collect_at)} class tokens, got {len(collected)}")
        stacked = torch.stack(list(collected), dim=-1)  # [B, C, K]
        h = self.aggregate(stacked.to(self.classifier.weight.dtype))  # [B, 2C, 1]
        return h.flatten(1) if pre_logits else self.classifier(h).flatten(1)

    def extra_repr(self) -> str:
        return f"append_at={self.append_at}, collect_at={self.collect_at}, cache_gap={self.cache_gap}, " \
               f"protect_cached={self.protect_cached}"


@dataclass(frozen=True)
class ClcaRun:
    """One forward's CLCA state (it travels in `TokenState.head`, never on the model)."""

    head: ClcaHead
    carrier_at: int
    cache: Tuple[torch.Tensor, ...] = ()
    collected: Tuple[torch.Tensor, ...] = ()

    def after_layer(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        head, layer = self.head, state.layer
        cache, collected = self.cache, self.collected
        # what earlier blocks cached joins first; this block's state is cached for the next append
        if layer in head.append_at and cache:
            at = state.n_prefix if head.protect_cached else x.shape[1]
            x, state = insert_tokens(x, state, at, cache, protect=head.protect_cached)
            cache = ()
        if head.append_at and layer < head.append_at[-1]:
            entries = []
            if head.cache_gap and x.shape[1] > state.n_prefix:
                entries.append(x[:, state.n_prefix:].mean(dim=1, keepdim=True))
            entries.append(x[:, self.carrier_at:self.carrier_at + 1])
            cache = cache + tuple(entries)
        if layer in head.collect_at:
            collected = collected + (x[:, 0],)
        return x, state.replace(head=ClcaRun(head, self.carrier_at, cache, collected))
