"""patch / unpatch / methods / inspect."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .backends import backend_of, find_backend
from . import heads
from .backends.base import ATTR, attach, drop_scratch, get_info, restore_classes
from .methods import REGISTRY as METHODS, get_method, method_names
from .methods.base import vlm_only, vlm_places
from .state import binary_source


def methods() -> List[str]:
    """Names of the registered methods."""
    return method_names()


def patch(model: nn.Module, method: Optional[str] = None, head: Optional[str] = None,
          head_options: Optional[Dict[str, Any]] = None, site: Optional[str] = None, kv: Optional[str] = None,
          kv_options: Optional[Dict[str, Any]] = None, **options: Any) -> nn.Module:
    """Make `model` reduce tokens with `method`, in place; returns the model.

    Options are the method's config fields (see `tome_plus.methods.get_method(name).config_class`):
    one budget of `r`, `keep`, `flops` or `tokens`, plus `prop_attn`, `trace_source`, `weighted_pool` and
    the method's own. Patching a patched model replaces its method (and its head).

    `head="clca"` (timm classifiers) replaces the model's final norm and head by the cross-layer
    cache and aggregation head (`tome_plus.heads`, options `head_options`, see `ClcaConfig`); it
    is trained by fine-tuning (`tome-plus finetune`) and saved alone with `tome_plus.heads.save`.

    `site` (vision-language models) says where the tokens go: "tower" (inside the vision
    encoder's layers), "features" (the image features, before the language model) or "llm"
    (between the language model's layers: atp, fastv); None takes the best the model allows.

    `kv` (a language model's, a VLM's or a text-only Llama-family LM's) prunes its KV cache while it
    decodes: `kv="a2sf"` with `kv_options` (`tome_plus.kv.a2sf.A2sf`: budget, forget,
    recent, scoring, every); alone (`method` None) or with a method.
    """
    if method is None:
        if kv is None:
            raise TypeError("give a method (tome_plus.methods() lists them), or kv=... for a KV-cache policy alone")
        if options or head or site:
            raise TypeError(f"{sorted(options) + [n for n, v in (('head', head), ('site', site)) if v]} "
                            f"belong to a method; give one, or kv=... alone")
    elif kv is None and kv_options:
        raise TypeError("kv_options need a KV policy, e.g. kv='a2sf'")
    kv_config = None
    if kv is not None:
        from .kv import make_config
        kv_config = make_config(kv, kv_options)
        backend = find_backend(model)
        if not getattr(backend, "KV", False):
            raise TypeError(f"kv={kv!r} prunes a language model's KV cache; {type(model).__name__} has none")
        if method is None:
            info = backend.prepare_kv(model, kv_config)
            info.backend = backend.__name__
            unpatch(model)
            backend.install(model, info)
            setattr(model, ATTR, info)
            return model
    if head is None and head_options:
        raise TypeError("head_options need a head, e.g. head='clca'")
    head_config = heads.make_config(head, head_options) if head is not None else None
    reducer_cls = get_method(method)
    config_cls = METHODS.check_options(method, options)  # built once the site is known (below)
    backend = find_backend(model)
    if site is not None and not backend.SITES:
        raise TypeError(f"site={site!r} places a method in a vision-language model; {type(model).__name__} "
                        f"({backend.KIND}) reduces in its own layers only")
    if head is not None and not backend.HEADS:
        raise TypeError(f"head={head!r} replaces a classifier's head; the {backend.KIND} backend "
                        f"({type(model).__name__}) has none to replace")
    if vlm_only(reducer_cls) and not backend.SITES:
        raise TypeError(f"method {method!r} selects the image tokens a vision-language model's language model "
                        f"receives, once ({vlm_places(reducer_cls)}); "
                        f"{type(model).__name__} ({backend.KIND}) has no such place")
    if reducer_cls.target == "llm" and not backend.LLM_METHODS:
        raise TypeError(f"method {method!r} prunes inside the language model of a LLaVA-style model; "
                        f"{type(model).__name__} has none")
    if backend.SITES:  # the site first: a wrong one is named before the method's options ask for a budget
        site = backend.check_site(model, reducer_cls, site)
    config = config_cls(**options)
    if getattr(config, "positions", "kept") != "kept" and site not in ("features", "llm"):
        raise ValueError(f"positions={config.positions!r} places the kept tokens of site='features' or 'llm' in a "
                         f"vision-language model; {method!r} here reduces at site={site!r}")
    reducer = reducer_cls(config)
    reducer.for_family(backend.KIND)
    info = backend.prepare(model, reducer, config, method, **({"site": site} if site is not None else {}))
    info.backend = backend.__name__
    if kv_config is not None:
        info = backend.prepare_kv(model, kv_config, info)
    n_default = backend.default_tokens(model)
    cost = info.cost(n_default)
    gflops_of = (lambda removals: cost.total(n_default, removals or [0] * info.depth) / 1e9) if cost else None
    reducer.for_model(backend.model_name(model), gflops_of)
    reducer.check(backend.depth(model))
    # the features site reads no layer's signals: a method there takes its own (`llm.features`)
    if site != "features" and not info.has_cls and any("cls_attn" in reducer.needs_at(layer)
                                                       for layer in range(info.depth)):
        raise ValueError(f"method {method!r} scores tokens by the class token's attention, but "
                         f"{type(model).__name__} has no class token")
    # solve for the model's default input now, so budget errors and warnings come from here,
    # and before anything changes: a failed re-patch leaves the working patch in place
    backend.check_budget(model, info)
    head_module = _build_head(model, backend, info, head, head_config) if head is not None else None
    unpatch(model)
    backend.install(model, info)
    setattr(model, ATTR, info)
    if head_module is not None:
        attach(model, heads.ATTR, head_module, info)
        info.head, info.head_name = head_module, head
    return model


def _build_head(model: nn.Module, backend, info, name: str, config) -> nn.Module:
    """The head for the blocks that reduce at the model's default input (weights loaded if given)."""
    removals = info.removals(backend.default_tokens(model))
    reducing = [layer for layer, r in enumerate(removals) if r > 0]
    module = heads.REGISTRY.get(name).build(model, config, reducing, info.depth)
    if config.weights is not None:
        heads.load_into(module, name, config.weights)
    return module.train(model.training)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original module classes; a no-op on an unpatched model."""
    info = get_info(model)
    if info is not None:
        restore_classes(info)
        delattr(model, ATTR)
    return model


def refresh(model: nn.Module) -> nn.Module:
    """Rebuild what the patch derived from the weights (proportional attention's padded qkv) on the
    next forward. Needed only after weight updates that bypass PyTorch's version counter and are not
    followed by `model.train()`/`model.eval()`: writes through `.data`, or storage refilled in place
    (FSDP). In-place updates, `load_state_dict`, `.to()` and optimizer steps followed by a mode
    switch are picked up without it. A no-op on an unpatched model."""
    info = get_info(model)
    if info is not None:
        drop_scratch(info)
    return model


@dataclass
class Inspection:
    """What the last forward of a patched model did.

    Attributes:
        method: the method's name.
        config: its options.
        removals: tokens removed after each block (the schedule for the last input size).
        tokens: tokens after each block in the last forward (prefix included).
        input_tokens: tokens entering the first block.
        size: `[B, N, 1]` input tokens each output token stands for.
        source: `[B, N, N0]` 0/1 map of the input tokens each output token holds (traced only).
        head: the head replacing the model's own ("clca"), or None.
        image_tokens: LLaVA only: `[B]` image tokens each sample of the last forward passed to the
            language model (what reached the projector, per image, is `tokens` at the feature
            layer less the class token under the "default" strategy).
        llm_kept: LLM-side methods (ATP, FastV) only: `[sites, B]` visual tokens each pruning site
            (an ATP module, FastV's layer K) kept, per instance.
        llm_positions: LLM-side methods only: per site, `[B, K]` position ids of the tokens kept
            (-1: padding).
        llm_newlines: site="features" only: `[B]` newline tokens among `llm_kept[0]` (LLaVA-NeXT's
            and OneVision's row markers, kept as they are; 0 in other families), so
            `llm_kept[0] - llm_newlines` are the reduced tokens a `tokens=N` budget counts.

    The visual tokens each sample kept at each stage (what a `tokens=N` budget is about):
    `image_tokens` after the tower, then `llm_kept` at each pruning site in the LLM.
    """

    method: str
    config: Dict[str, Any]
    removals: Optional[Tuple[int, ...]]
    tokens: Optional[Tuple[int, ...]]
    input_tokens: Optional[int]
    size: Optional[torch.Tensor]
    source: Optional[torch.Tensor]
    image_tokens: Optional[torch.Tensor] = None
    llm_kept: Optional[torch.Tensor] = None
    llm_positions: Optional[List[torch.Tensor]] = None
    llm_newlines: Optional[torch.Tensor] = None
    head: Optional[str] = None


def inspect(model: nn.Module) -> Inspection:
    """Tokens per layer, sizes and (when traced) the source map of the last forward."""
    info = get_info(model)
    if info is None:
        raise ValueError("model is not patched; call tome_plus.patch(model, method, ...) first")
    state, extra = backend_of(info).last_forward(info)
    config = asdict(info.config) if info.config is not None else {}
    if state is None:
        return Inspection(info.method, config, None, None, None, None, None, head=info.head_name, **extra)
    n_out = state.counts[-1] if state.counts else state.n_input
    size = state.size if state.size is not None else torch.ones(state.batch, n_out, 1, device=state.device)
    source = binary_source(state.source, n_out) if state.source is not None else None
    return Inspection(info.method, config, state.removals, state.counts, state.n_input, size, source,
                      head=info.head_name, **extra)
