"""What every backend shares: the per-model patch record and reversible class swaps.

Patching swaps `module.__class__` for a subclass that mixes in the reducing forward (ToMe's
approach): parameters, buffers and `state_dict` keys stay as they are, `isinstance` checks against
the original classes still hold, and `unpatch` puts the original classes back. The subclasses are
made on first use, so pickling names them by their two parents (both importable) instead: a
patched model survives `pickle`, `torch.save(model)`, `copy.deepcopy` and DataLoader workers.

Tracing and scripting. `torch.export` and `torch.jit.trace` run the patched forward on a real
input, so they record its removal schedule (fixed per input size) and need nothing here. The
other two cannot: `torch.fx.symbolic_trace` hands the forward a `Proxy`, whose token count is
unknown, and `torch.jit.script` compiles the source of the patched classes. Where the patched
forward computes exactly what the original does (nothing removed at any input size the model
takes, no head: `PatchInfo.reduces`), both see the original: under FX the patched methods call the
original class's (`fx_original`), and for scripting `__prepare_scriptable__` (which
`torch.jit.script` calls first) hands over `unpatched_view`, the module tree with its original
classes sharing the very parameters and buffers. Otherwise both refuse with one line naming
`torch.export` and `torch.jit.trace` (`FX_REFUSAL`, `SCRIPT_REFUSAL`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn

from ..methods.base import ReductionConfig, Reducer
from ..schedule import Cost, keep_schedule, r_schedule, solve
from ..prop_attn import SCRATCH
from ..state import TokenState, initial_source

ATTR = "_tome_plus"
_SUBCLASSES: Dict[Tuple[type, type], type] = {}

EXPORT_HINT = ("use torch.export.export(model, (x,)) or torch.jit.trace(model, x), which run the forward and "
               "record the removal schedule of x's size, or tome_plus.unpatch(model)")
FX_REFUSAL = ("tome_plus: torch.fx.symbolic_trace cannot follow a token reduction or a tome_plus head (their "
              "steps branch on tensor shapes, which a Proxy does not have); " + EXPORT_HINT)
SCRIPT_REFUSAL = ("tome_plus: torch.jit.script cannot compile a token reduction or a tome_plus head; "
                  + EXPORT_HINT)


@dataclass(eq=False)
class PatchInfo:
    """The patch record every backend keeps: on a patched model as `model._tome_plus` (a plain
    attribute: not in `state_dict`). What one backend or method needs beyond it lives in `parts`,
    a record of that backend's own (`timm_vit.ViTParts`, `vlm.sites.VlmParts`)."""

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
    # inner modules that carry this record (or an inner one: LLaVA's tower); untagged at unpatch
    tagged: List[nn.Module] = field(default_factory=list)
    # modules registered on the model (a head: `attach`), as (owner, attribute); removed at unpatch
    attached: List[Tuple[nn.Module, str]] = field(default_factory=list)
    # the method's trainable part (ATP's modules), if any: kept here only, not in the model's module
    # tree, so the model's `state_dict`, `parameters()` and `save_pretrained` are the unpatched ones
    modules: Optional[nn.Module] = None
    schedules: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    # a head that replaces the model's own (`patch(head=...)`, `heads/`): its module (also
    # registered on the model) and name; set by `api.patch` for a backend that answers HEADS
    head: Optional[nn.Module] = None
    head_name: Optional[str] = None
    # What `inspect` reports: written once a forward has finished, never read by a forward.
    last_state: Optional[TokenState] = None
    # the backend's (or its method's) own record; it pickles itself, dropping per-process state
    parts: Optional[Any] = None
    # a KV-cache policy's config (`tome_plus.kv`: a `KvPolicy`, e.g. `A2sf`), or None
    kv: Optional[Any] = None
    # the backend module that patched the model (its `__name__`; set by `patch`), for what only the
    # family can answer later (`Backend.last_forward`) wherever the record is found
    backend: Optional[str] = None

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
        if self.reduce_depth is not None and layer >= self.reduce_depth:
            return False
        if self.reducer.last_layer_only:  # VisionZip: the layer whose output is the features
            return layer == (self.reduce_depth or self.depth) - 1
        return self.reducer.active(layer)

    def reduces(self, n_tokens: Optional[int] = None) -> bool:
        """Whether the patched forward may compute anything other than the original: a head or a
        trainable part replaces or joins the model's own, or some layer removes tokens, for
        `n_tokens` input tokens (a model whose input size is fixed), or at some input size (None).
        Host-side only: read while tracing or scripting, never by a forward."""
        if self.head is not None or self.attached or self.modules is not None:
            return True
        if n_tokens is not None:
            return any(self.removals(n_tokens))
        if type(self.reducer).removals is not Reducer.removals:  # a schedule of its own, for one size
            return True
        kind, value = self.config.budget
        if kind == "r":
            return any(r_schedule(value, self.depth))
        if kind == "keep":
            return any(k < 1.0 for k in keep_schedule(value, self.depth))
        return True  # flops: solved per input size

    def new_state(self, x: torch.Tensor, trace: bool = False) -> TokenState:
        # int(): under torch.jit.trace sizes are traced values; the schedule is static per size anyway
        batch, n_tokens = int(x.shape[0]), int(x.shape[1])
        source = initial_source(batch, n_tokens, x.device) if (trace or self.config.trace_source) else None
        return TokenState(reducer=self.reducer, removals=self.removals(n_tokens), n_prefix=self.n_prefix,
                          has_cls=self.has_cls, prop_attn=self.config.prop_attn, batch=batch, n_input=n_tokens,
                          device=x.device, log_size_scale=self.log_size_scale, source=source)

    def __getstate__(self) -> dict:
        # the last forward's tensors belong to this process only
        return dict(self.__dict__, last_state=None)


def patched_class(mixin: type, cls: type) -> type:
    """The class `(mixin, cls)`, made once per pair."""
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        attrs = {"__reduce_ex__": _reduce_patched, "_tome_plus_parents": key, "__module__": mixin.__module__}
        hf_model = _is_hf_model(cls)
        if hf_model:
            attrs.update(is_custom_code=classmethod(_original_is_custom_code), save_pretrained=_save_as_original,
                         from_pretrained=classmethod(_original_constructor("from_pretrained")),
                         _from_config=classmethod(_original_constructor("_from_config")))
        _SUBCLASSES[key] = type(f"TomePlus{cls.__name__}", (mixin, cls), attrs)
        if hf_model:
            _share_conversions(cls, _SUBCLASSES[key].__name__)
    return _SUBCLASSES[key]


def _is_hf_model(cls: type) -> bool:
    # a transformers model class: its module is loaded already (this never imports transformers)
    utils = sys.modules.get("transformers.modeling_utils")
    return utils is not None and issubclass(cls, utils.PreTrainedModel)


def _original_is_custom_code(patched: type) -> bool:
    """`PreTrainedModel.is_custom_code` of a patched class: its original's answer. Else our
    `__module__` makes it custom code, whose checkpoint conversions HF skips
    (`conversion_mapping.get_model_conversion_mapping`): `save_pretrained` would write other keys."""
    return patched._tome_plus_parents[1].is_custom_code()


def _save_as_original(self, *args, **kwargs):
    """`save_pretrained` of a patched model: as its original class, which HF writes into the
    config's `architectures` (a checkpoint saved while patched loads as the unpatched model)."""
    patched = type(self)
    self.__class__ = patched._tome_plus_parents[1]
    try:
        return self.save_pretrained(*args, **kwargs)
    finally:
        self.__class__ = patched


def _original_constructor(name: str):
    """`from_pretrained` / `_from_config` called on a patched class: the original class's (an
    unpatched model; a patched class without its patch record would not run)."""
    return lambda patched, *args, **kwargs: getattr(patched._tome_plus_parents[1], name)(*args, **kwargs)


def _share_conversions(cls: type, name: str) -> None:
    """Give the patched class `name` the conversions HF keeps under `cls`'s name (e.g.
    `Qwen2_5_VLModel`'s), which it looks up before the model type's: the unpatched lookup order."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # a transformers without checkpoint conversions
        return
    mapping = get_checkpoint_conversion_mapping(cls.__name__)
    if mapping is not None:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


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


def attach(owner: nn.Module, name: str, module: nn.Module, info: PatchInfo) -> None:
    """Register a head under `owner.name` (in its `state_dict`, moved with `.to()`) until unpatched:
    it replaces the model's own head, so it belongs to the model's weights. A method's trainable
    part (ATP's modules) stays off the module tree, on `info.modules`."""
    owner.add_module(name, module)
    info.attached.append((owner, name))


def tag(module: nn.Module, info: PatchInfo) -> None:
    """Let an inner module find the patch record (`get_info(module)`) until unpatched."""
    setattr(module, ATTR, info)
    info.tagged.append(module)


def adopt(info: PatchInfo, inner: PatchInfo) -> None:
    """Let `info` undo what installing `inner` did (a part patched with a record of its own, e.g.
    LLaVA's tower under ATP): `unpatch` and `refresh` of `info` then cover it. Its modules stay
    tagged with `inner`, so they keep reducing by their own record."""
    info.swapped.extend(inner.swapped)
    info.tagged.extend(inner.tagged)
    info.attached.extend(inner.attached)
    inner.swapped.clear()
    inner.tagged.clear()
    inner.attached.clear()


def restore_classes(info: PatchInfo) -> None:
    drop_scratch(info)
    for module, cls in reversed(info.swapped):  # a module swapped twice (a method's, then a KV policy's) ends as it began
        module.__class__ = cls
    for module in info.tagged:
        module.__dict__.pop(ATTR, None)
    for owner, name in info.attached:
        delattr(owner, name)
    info.swapped.clear()
    info.tagged.clear()
    info.attached.clear()


def get_info(model: nn.Module) -> Optional[PatchInfo]:
    return getattr(model, ATTR, None)


def model_name(model: nn.Module) -> Optional[str]:
    """The model's name where known, for methods with per-model presets: timm's with its tag
    (`vit_base_patch16_224.mae`, or the architecture alone), else HF's `config._name_or_path`."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if arch:
        return f"{arch}.{tag}" if tag else arch
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def last_forward(info: PatchInfo) -> Tuple[Optional[TokenState], Dict[str, Any]]:
    """`Backend.last_forward` of a family whose record's own state is what `inspect` reports."""
    return info.last_state, {}


def is_fx_proxy(x: object) -> bool:
    """Whether `x` is a `torch.fx.symbolic_trace` placeholder (an isinstance check: no launch, no sync)."""
    return isinstance(x, torch.fx.Proxy)


def fx_original(module: nn.Module, info: PatchInfo, n_tokens: Optional[int], name: str, *args, **kwargs):
    """Under `torch.fx.symbolic_trace`: the original class's method `name`, traced as the original
    would be, where the patched one computes the same (`info.reduces(n_tokens)` false); else
    `FX_REFUSAL`. `n_tokens`: the model's token count when its input size is fixed, else None."""
    if info.reduces(n_tokens):
        raise torch.fx.proxy.TraceError(FX_REFUSAL)
    proxy = next((a for a in (*args, *kwargs.values()) if is_fx_proxy(a)), None)
    if proxy is not None:
        _autowrap_original(module, proxy.tracer)
    return getattr(original_class(module), name)(module, *args, **kwargs)


def _autowrap_original(module: nn.Module, tracer: torch.fx.Tracer) -> None:
    """Let the tracer wrap its `autowrap_functions` (timm's `register_notrace_function`s, e.g.
    `resample_abs_pos_embed`) where the original forward finds them, as it does for an unpatched
    module. It looks them up in the traced forward's globals only, which for a patched module are
    tome_plus's, so shape-dependent helpers would otherwise be traced into. Private torch.fx API:
    where it is missing, tracing goes on as before."""
    from torch.fx import _symbolic_trace
    patcher = getattr(_symbolic_trace, "CURRENT_PATCHER", None)
    check = getattr(_symbolic_trace, "_autowrap_check", None)
    ids = getattr(tracer, "_autowrap_function_ids", None)
    if patcher is not None and check is not None and ids:
        check(patcher, original_class(module).forward.__globals__, ids)


def prepare_scriptable(module: nn.Module, info: Optional[PatchInfo], n_tokens: Optional[int]) -> nn.Module:
    """`__prepare_scriptable__` of a patched module: its `unpatched_view` where the patched forward
    computes what the original does (`info` None: a block or layer, which does whenever it is
    called alone), else `SCRIPT_REFUSAL`."""
    if info is not None and info.reduces(n_tokens):
        raise RuntimeError(SCRIPT_REFUSAL)
    return unpatched_view(module)


def unpatched_view(module: nn.Module) -> nn.Module:
    """`module` and everything under it with their original classes, as new module objects that
    share the parameters and buffers (the tensors themselves) with the patched ones; what the patch
    added (its record, cached padded weights, trainable parts) is left out. The patched tree is not
    touched, so `torch.jit.script` may rewrite the view's submodules freely."""
    infos = [get_info(m) for m in module.modules()]
    attached = {(id(owner), name) for info in infos if info is not None for owner, name in info.attached}
    memo: Dict[int, nn.Module] = {}

    def view(m: nn.Module) -> nn.Module:
        if id(m) in memo:  # shared submodules stay shared
            return memo[id(m)]
        cls = original_class(m)
        copy = cls.__new__(cls)
        state = {k: v for k, v in m.__dict__.items() if k not in (ATTR, SCRATCH)}
        state["_parameters"] = dict(m._parameters)
        state["_buffers"] = dict(m._buffers)
        state["_modules"] = {}
        copy.__dict__.update(state)
        memo[id(m)] = copy
        for name, child in m._modules.items():
            if (id(m), name) not in attached:
                copy._modules[name] = view(child) if child is not None else None
        return copy

    return view(module)
