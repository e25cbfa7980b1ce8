"""What every backend shares: the per-model patch record and reversible class swaps.

Patching swaps `module.__class__` for a subclass that mixes in the reducing forward (ToMe's
approach): parameters, buffers and `state_dict` keys stay as they are, `isinstance` checks against
the original classes still hold, and `unpatch` puts the original classes back. The subclasses are
made on first use, so pickling names them by their two parents (both importable) instead: a
patched model survives `pickle`, `torch.save(model)`, `copy.deepcopy` and DataLoader workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from ..methods.base import ReductionConfig, Reducer
from ..schedule import Cost, solve
from ..prop_attn import SCRATCH
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
    cost: Callable[[int], Cost]  # n_tokens -> FLOPs model, for the flops budget (picklable)
    # 1 / attention scale: the size channel holds log(s) / scale; None where the channel never runs
    log_size_scale: Optional[float] = None
    # only the first `reduce_depth` layers may reduce (LLaVA: those feeding the image features)
    reduce_depth: Optional[int] = None
    swapped: List[Tuple[nn.Module, type]] = field(default_factory=list)
    # inner modules that carry this record too (an HF encoder inside a tower); untagged at unpatch
    tagged: List[nn.Module] = field(default_factory=list)
    # trainable parts registered on the model (ATP's modules), as (owner, attribute); removed at unpatch
    attached: List[Tuple[nn.Module, str]] = field(default_factory=list)
    modules: Optional[nn.Module] = None  # the method's trainable part, if any
    tower: Optional["PatchInfo"] = None  # LLaVA with an LLM method: the vision tower's own record
    llm_kept: Optional[torch.Tensor] = None  # ATP: [modules, B] visual tokens each module kept, last forward
    llm_positions: Optional[List[torch.Tensor]] = None  # ATP: per module [B, K] position ids kept (-1: pad)
    schedules: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    # a head that replaces the model's own (`heads/`): its module (also registered on the model) and name
    head: Optional[nn.Module] = None
    head_name: Optional[str] = None
    # What `inspect` reports: written once a forward has finished, never read by a forward.
    last_state: Optional[TokenState] = None
    image_tokens: Optional[torch.Tensor] = None  # LLaVA: image tokens per sample the LLM last received
    # forward_features' outputs (by identity, weakly held) -> their sizes. Keyed by the tensor
    # itself, so nested or concurrent forwards never see each other's entries.
    feature_sizes: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    # the same for a head's per-forward state (CLCA's collected class tokens)
    feature_heads: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)

    def removals(self, n_tokens: int, strict: bool = False) -> Tuple[int, ...]:
        """Per-layer removal counts for `n_tokens` input tokens (solved once per size).

        `strict`: an unreachable `flops` target raises (at `patch`); inside a forward it warns and
        uses the closest schedule instead, so an unusual input size never fails mid-inference.
        """
        if n_tokens not in self.schedules:
            explicit = self.reducer.removals(n_tokens, self.n_prefix)
            if explicit is not None:
                self.schedules[n_tokens] = tuple(explicit)
                return self.schedules[n_tokens]
            counts = solve(self.config.budget, self.reducer.budget_unit, self.depth, n_tokens,
                           self.n_prefix, self.reducer.max_remove, self.cost(n_tokens),
                           active=self.active, keep_removal=self.reducer.keep_removal,
                           strict=strict)
            self.schedules[n_tokens] = tuple(counts)
        return self.schedules[n_tokens]

    def active(self, layer: int) -> bool:
        return (self.reduce_depth is None or layer < self.reduce_depth) and self.reducer.active(layer)

    def new_state(self, x: torch.Tensor, trace: bool = False) -> TokenState:
        # int(): under torch.jit.trace sizes are traced values; the schedule is static per size anyway
        batch, n_tokens = int(x.shape[0]), int(x.shape[1])
        source = initial_source(batch, n_tokens, x.device) if (trace or self.config.trace_source) else None
        return TokenState(reducer=self.reducer, removals=self.removals(n_tokens), n_prefix=self.n_prefix,
                          has_cls=self.has_cls, prop_attn=self.config.prop_attn, batch=batch, n_input=n_tokens,
                          device=x.device, log_size_scale=self.log_size_scale, source=source)

    def __getstate__(self) -> dict:
        # the last forward's tensors and the weak features map belong to this process only
        state = dict(self.__dict__)
        state["last_state"] = None
        state["image_tokens"] = None
        state["llm_kept"] = None
        state["llm_positions"] = None
        state["feature_sizes"] = None
        state["feature_heads"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.feature_sizes = WeakIdKeyDictionary()
        self.feature_heads = WeakIdKeyDictionary()

    def remember_features(self, x: torch.Tensor, size: Optional[torch.Tensor], head=None) -> None:
        """Keep the sizes (and the head's state) of a tensor `forward_features` returned, for a
        later `forward_head(x)`; the entries go when the tensor does."""
        if size is not None:
            self.feature_sizes[x] = size
        if head is not None:
            self.feature_heads[x] = head

    def features_size(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Sizes of `x` if it is the very tensor a `forward_features` call returned, else None."""
        return self.feature_sizes.get(x)


def patched_class(mixin: type, cls: type) -> type:
    """The class `(mixin, cls)`, made once per pair."""
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"TomePlus{cls.__name__}", (mixin, cls),
                                {"__reduce_ex__": _reduce_patched, "_tome_plus_parents": key,
                                 "__module__": mixin.__module__})
    return _SUBCLASSES[key]


def _new_patched(mixin: type, cls: type) -> nn.Module:
    """Unpickling: an empty instance of the patched class, made again from its parents."""
    patched = patched_class(mixin, cls)
    return patched.__new__(patched)


def _reduce_patched(self: nn.Module, protocol: int):
    # the default reduction names the class itself, which no module defines
    reduced = list(object.__reduce_ex__(self, max(protocol, 2)))
    if isinstance(reduced[2], dict) and SCRATCH in reduced[2]:
        reduced[2] = {k: v for k, v in reduced[2].items() if k != SCRATCH}
    return (_new_patched, type(self)._tome_plus_parents) + tuple(reduced[2:])


def original_class(module: nn.Module) -> type:
    """The class `module` had before patching (its own class when not patched)."""
    return getattr(type(module), "_tome_plus_parents", (None, type(module)))[1]


def swap_class(module: nn.Module, mixin: type, info: PatchInfo) -> None:
    """Give `module` the class `(mixin, type(module))`, remembering the original."""
    cls = type(module)
    info.swapped.append((module, cls))
    module.__class__ = patched_class(mixin, cls)


def drop_scratch(info: PatchInfo) -> None:
    """Forget what the patched modules derived from their weights (rebuilt on the next forward)."""
    for module, _ in info.swapped:
        module.__dict__.pop(SCRATCH, None)


def attach(owner: nn.Module, name: str, module: nn.Module, info: PatchInfo, method_part: bool = True) -> None:
    """Register a trainable part under `owner.name` (in its `state_dict`, moved with `.to()`) until
    unpatched; `method_part`: it is the method's own (`info.modules`), not a head's."""
    owner.add_module(name, module)
    info.attached.append((owner, name))
    if method_part:
        info.modules = module


def tag(module: nn.Module, info: PatchInfo) -> None:
    """Let an inner module find the patch record (`get_info(module)`) until unpatched."""
    setattr(module, ATTR, info)
    info.tagged.append(module)


def restore_classes(info: PatchInfo) -> None:
    drop_scratch(info)
    for module, cls in info.swapped:
        module.__class__ = cls
    for module in info.tagged:
        module.__dict__.pop(ATTR, None)
    for owner, name in info.attached:
        delattr(owner, name)
    if info.tower is not None:
        restore_classes(info.tower)
    info.swapped.clear()
    info.tagged.clear()
    info.attached.clear()


def get_info(model: nn.Module) -> Optional[PatchInfo]:
    return getattr(model, ATTR, None)
