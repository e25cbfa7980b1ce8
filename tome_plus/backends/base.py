"""What every backend shares: the per-model patch record and reversible class swaps.

Patching swaps `module.__class__` for a subclass that mixes in the reducing forward (ToMe's
approach): parameters, buffers and `state_dict` keys stay as they are, `isinstance` checks against
the original classes still hold, and `unpatch` puts the original classes back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from ..methods.base import ReductionConfig, Reducer
from ..schedule import VitCost, solve
from ..state import TokenState, initial_source

ATTR = "_tome_plus"
_SUBCLASSES: Dict[Tuple[type, type], type] = {}


@dataclass(eq=False)
class PatchInfo:
    """Lives on a patched model as `model._tome_plus` (a plain attribute: not in `state_dict`)."""

    method: str
    config: ReductionConfig
    reducer: Reducer
    depth: int
    n_prefix: int
    has_cls: bool
    cost: Callable[[int], VitCost]  # n_tokens -> FLOPs model, for the flops budget
    swapped: List[Tuple[nn.Module, type]] = field(default_factory=list)
    schedules: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    last_state: Optional[TokenState] = None
    head_size: Optional[torch.Tensor] = None  # set by `forward` while its head runs
    # forward_features' outputs (by identity, weakly held) -> their sizes
    feature_sizes: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)

    def removals(self, n_tokens: int) -> Tuple[int, ...]:
        """Per-layer removal counts for `n_tokens` input tokens (solved once per size)."""
        if n_tokens not in self.schedules:
            counts = solve(self.config.budget, self.reducer.budget_unit, self.depth, n_tokens,
                           self.n_prefix, self.reducer.max_remove, self.cost(n_tokens),
                           active=self.reducer.active)
            self.schedules[n_tokens] = tuple(counts)
        return self.schedules[n_tokens]

    def new_state(self, x: torch.Tensor, trace: bool = False) -> TokenState:
        batch, n_tokens = x.shape[0], x.shape[1]
        source = initial_source(batch, n_tokens, x.device) if (trace or self.config.trace_source) else None
        return TokenState(reducer=self.reducer, removals=self.removals(n_tokens), n_prefix=self.n_prefix,
                          has_cls=self.has_cls, prop_attn=self.config.prop_attn, batch=batch, n_input=n_tokens, source=source)

    def remember_features(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> None:
        """Keep the sizes of a tensor `forward_features` returned, for a later `forward_head(x)`;
        the entry goes when the tensor does."""
        if size is not None:
            self.feature_sizes[x] = size

    def features_size(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Sizes of `x` if it is the very tensor a `forward_features` call returned, else None."""
        return self.feature_sizes.get(x)


def swap_class(module: nn.Module, mixin: type, info: PatchInfo) -> None:
    """Give `module` the class `(mixin, type(module))`, remembering the original."""
    cls = type(module)
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"TomePlus{cls.__name__}", (mixin, cls), {})
    info.swapped.append((module, cls))
    module.__class__ = _SUBCLASSES[key]


def restore_classes(info: PatchInfo) -> None:
    for module, cls in info.swapped:
        module.__class__ = cls
    info.swapped.clear()


def get_info(model: nn.Module) -> Optional[PatchInfo]:
    return getattr(model, ATTR, None)
