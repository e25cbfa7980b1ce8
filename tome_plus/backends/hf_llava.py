"""HF transformers backend: vision-language models (`LlavaForConditionalGeneration`,
`VipLlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
`LlavaNextVideoForConditionalGeneration`, `LlavaOnevisionForConditionalGeneration`,
`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` and their subclasses).

This module is the family's `contract.Backend`: its names and capabilities, where a method may go
(`SITES`, `default_site`, `check_site`), and the contract's functions, which delegate to
`tome_plus.vlm` (the sites' checks, records and classes: `vlm.sites`; what an image puts into the
LLM: `vlm.images`; the prompt: `vlm.prompt`; the patched calls: `vlm.calls`) and, inside the
language model, to `tome_plus.llm`.

At the `tower` site the vision tower (CLIP or SigLIP) reduces through `hf_clip`; only the layers
that feed the image features (`vision_feature_layer`, e.g. -2 of 24: the first 23) reduce, so no
work is spent on a reduction nobody reads, and the prompt's placeholder runs are cut to match
(`vlm.calls`). That needs a projector that takes any token count (LLaVA-1.5, VipLLaVA). At the
`features` and `llm` sites (every family here) the prompt stays whole and the language model
reduces inside (`llm.decoder`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch.nn as nn

from ..kv import engine
from ..methods import get_method, method_names
from ..methods.base import ReductionConfig, Reducer
from ..vlm import calls, images, sites
from ..vlm.families import FAMILIES, family
from . import base, hf_clip
from .base import PatchInfo, swap_class, tag

KIND = "hf"
HEADS = False  # a generative model: no classifier head to replace
LLM_METHODS = True  # methods that prune inside the language model (ATP) run here
# the families' rows (`vlm.families.FAMILIES`): those whose tower reduces, and the packed ones
FAMILY = ("HF transformers " + ", ".join(row.model for row in FAMILIES.values() if row.tower is not None)
          + " (the vision tower reduces, the LLM gets fewer image tokens, or the LLM prunes: atp, fastv); "
          + ", ".join(row.model for row in FAMILIES.values() if row.tower is None)
          + " (the image features reduce: tome, pitome, zero_tprune; or the LLM prunes: atp, fastv)")
MODELS = tuple(row.classes()[0] for row in FAMILIES.values())
model_name = base.model_name  # HF's `config._name_or_path`
# where a vision-language model reduces: the tower's layers, the image features before the LLM,
# or between the LLM's layers
SITES = ("tower", "features", "llm")
KV = True  # the language model's cache can follow a KV policy (`tome_plus.kv`)


def last_forward(info: PatchInfo) -> Tuple[Optional[Any], Dict[str, Any]]:
    """The tower's last state (the layers that reduced) and the family's own `Inspection` fields."""
    parts = info.parts
    state = info.last_state if parts.tower is None else parts.tower.last_state
    return state, dict(image_tokens=parts.image_tokens, llm_kept=parts.llm_kept, llm_positions=parts.llm_positions,
                       llm_newlines=parts.llm_newlines)


def matches(model: nn.Module) -> bool:
    return isinstance(model, MODELS)


def depth(model: nn.Module) -> int:
    """The tower's depth; for a model whose tower does not reduce (its row's `tower` None), the LLM's."""
    if family(model).tower is None:
        return len(model.model.language_model.layers)
    return hf_clip.depth(images.tower(model))


def default_tokens(model: nn.Module) -> int:
    """Tokens entering the tower for an image of its configured size (0 where images have no one
    count: no tower adapter, where nothing is scheduled)."""
    return 0 if family(model).tower is None else hf_clip.default_tokens(images.tower(model))


def default_site(model: nn.Module, reducer: Union[Reducer, Type[Reducer]]) -> str:
    """The best site the model allows the method: in the LLM for an LLM method; for a vision
    method the tower where the projector takes any count (the tower's layers get cheaper too)
    and the method runs there, else the image features."""
    if reducer.target == "llm":
        return "llm"
    return "features" if family(model).tower is None or "tower" not in reducer.vlm_sites else "tower"


def check_site(model: nn.Module, reducer: Union[Reducer, Type[Reducer]], site: Optional[str]) -> str:
    """The site `reducer` (a method's class or instance) runs at in `model`: `site`, or None for
    `default_site`; a pairing that does not fit is refused by name. `patch` asks this before the
    method's options, so a wrong site is named before anything asks for a budget."""
    name = type(model).__name__
    site = default_site(model, reducer) if site is None else site
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(map(repr, SITES))}, got {site!r}")
    if reducer.target == "llm" and site != "llm":
        raise ValueError(f"method {reducer.name!r} prunes inside the language model: site='llm'")
    if reducer.target != "llm" and site == "llm":
        raise ValueError(f"method {reducer.name!r} reduces vision tokens: site='tower' or 'features'; inside the "
                         f"language model prune with {', '.join(map(repr, methods_at('llm')))}")
    row = family(model)
    if site == "tower" and row.tower is None:
        reason = row.packed or "has a vision tower tome_plus does not reduce in"
        raise ValueError(f"{name} {reason}: a method in the vision tower would break "
                         f"that. On this model reduce the image features (site='features': "
                         f"{', '.join(methods_at('features'))}) or prune inside the language model "
                         f"({', '.join(map(repr, methods_at('llm')))})")
    if site not in reducer.vlm_sites:
        raise ValueError(f"site={site!r} runs {', '.join(methods_at(site))}, not {reducer.name!r}")
    return site


def methods_at(site: str) -> List[str]:
    """The registered methods that declare `site` among their `vlm_sites`."""
    return [name for name in method_names() if site in get_method(name).vlm_sites]


def prepare(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str,
            site: Optional[str] = None) -> PatchInfo:
    if model.config.image_token_id is None:
        raise ValueError("the config has no image_token_id: the image placeholders cannot be found")
    return sites.prepare(model, reducer, config, method, check_site(model, reducer, site))


def check_budget(model: nn.Module, info: PatchInfo) -> None:
    if info.reducer is None:  # a KV policy alone
        return
    record = images.tower_of(info)
    if record is not None:
        record.removals(default_tokens(model), strict=True)


def prepare_kv(model: nn.Module, kv, info: Optional[PatchInfo] = None) -> PatchInfo:
    """The KV policy `kv` for the language model, alone (`info` None) or with the patch `info`."""
    engine.check_decoder(model.model.language_model, kv.name)
    if info is None:
        info = PatchInfo(method=None, config=None, reducer=None, depth=len(model.model.language_model.layers),
                         n_prefix=0, has_cls=False, cost=sites.no_cost, parts=sites.VlmParts(site=None))
    info.kv = kv
    return info


def install(model: nn.Module, info: PatchInfo) -> None:
    sites.install(model, info)
    if info.kv is not None:
        engine.install(model.model.language_model, info)
    swap_class(model.model, calls.PatchedVlmModel, info)
    tag(model.model, info)
    swap_class(model, calls.PatchedVlmForGeneration, info)
