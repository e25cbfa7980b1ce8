"""The three places a vision-language model reduces (`hf_llava.SITES`: the vision tower, the image
features before the language model, between the language model's layers), and what each needs
at `patch`: its checks, its patch record (`VlmParts`, the family's part of `PatchInfo`) and the
classes it swaps in (`install`). Which site a method goes to is the backend's
(`hf_llava.check_site`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
from transformers.masking_utils import flash_attention_mask, flex_attention_mask

from ..backends import hf_clip
from ..backends.base import PatchInfo, adopt, swap_class, tag
from ..llm.attention import RoutedAttention
from ..llm import decoders
from ..llm.decoder import PruningDecoder, method_at
from ..llm.segments import mask_builder
from ..methods import get_method
from ..methods.base import ReductionConfig, Reducer
from .images import count_known, dropped, feature_depth, tokens_per_image, tower


@dataclass(eq=False)
class VlmParts:
    """What a VLM patch keeps beyond the shared record (`PatchInfo.parts`). With a tower method
    the shared record is the tower's (`hf_clip.prepare`); with ATP it is ATP's, and the tower's
    own record, if the tower reduces too, is `tower`."""

    tower: Optional[PatchInfo] = None
    # where the method reduces: "tower", "features" or "llm" (`hf_llava.SITES`); None: no method (a KV policy alone)
    site: Optional[str] = "tower"
    # the last forward, for `inspect` (never read by a forward; not pickled)
    image_tokens: Optional[torch.Tensor] = None  # [B] image tokens per sample the LLM last received
    llm_kept: Optional[torch.Tensor] = None  # ATP, FastV: [sites, B] visual tokens each pruning site kept
    llm_positions: Optional[List[torch.Tensor]] = None  # ATP, FastV: per site [B, K] position ids kept (-1: pad)
    llm_newlines: Optional[torch.Tensor] = None  # the features site: [B] newline tokens kept, never reduced
    # a `tokens=` budget needs no more checks: checked at `patch` where every image's count is known, or
    # found above an image's count in a forward and warned of (`llm.features.warn_tokens_once`)
    tokens_checked: bool = False

    def __getstate__(self) -> dict:
        return dict(self.__dict__, image_tokens=None, llm_kept=None, llm_positions=None, llm_newlines=None)


def in_llm(info: PatchInfo) -> bool:
    """Whether the patched language model reduces (ATP and FastV between its layers, a vision
    method on the features before its first), not the tower."""
    return info.parts.site in ("features", "llm")


def no_cost(n_tokens: int) -> None:
    """ATP's counts are decided per instance at run time: there is no schedule to solve."""
    return None


def prepare(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str, site: str) -> PatchInfo:
    """The patch record of `method` at `site` (checked already: `hf_llava.check_site`)."""
    if site == "tower":
        if getattr(config, "cls_token", False) and hf_clip.has_cls(tower(model)) and not dropped(model.config):
            # VisionZip sends the class token as a dominant token; "full" sends it already
            raise ValueError(f"{method} with cls_token=True sends the class token among the image tokens, which the "
                             f"'full' feature selection sends already: pass cls_token=False")
        info = hf_clip.prepare(tower(model), reducer, config, method, reduce_depth=feature_depth(model))
        info.parts = VlmParts()
        return info
    if site == "features":
        return prepare_features(model, reducer, config, method)
    return prepare_llm(model, reducer, config, method)


# the `cache_implementation`s whose layers hold per-row kept slots (`llm.slots`): appending or
# full-length static buffers; a sliding window drops slots by conversation length. HF's generate
# unsets "hybrid" (Gemma 3's checkpoints name it) for the dynamic cache
CACHES = (None, "dynamic", "static", "offloaded", "offloaded_static", "quantized", "hybrid")


def check_decoder(model: nn.Module, label: str, kind: str = "llm") -> nn.Module:
    """The language model, if its layers can run with tokens pruned between them (refused by name
    otherwise; `kind` as `decoders.check_decoder`'s); the model's generation config must ask for a
    cache that holds per-row slots."""
    llm = model.model.language_model
    decoders.check_decoder(llm, label, kind)
    cache_kind = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if cache_kind not in CACHES:
        raise ValueError(f"the model's generation_config asks for cache_implementation={cache_kind!r}; {label} keeps "
                         f"a different number of tokens per instance in each layer's cache, which the full-attention "
                         f"caches hold ({', '.join(map(repr, CACHES[1:]))}): set one of them, or None")
    builder = mask_builder(llm.config._attn_implementation)  # a backend whose masks cannot be built: refused now
    row = decoders.decoder_adapter(llm)
    if decoders.explicit_masks(row) and builder in (flex_attention_mask, flash_attention_mask):
        raise ValueError(f"{label} on {type(llm).__name__} builds masks with attention both ways within an image and "
                         f"sliding windows, which the {llm.config._attn_implementation} backend's mask cannot say: "
                         f"load the model with attn_implementation='sdpa' or 'eager'")
    if (row.sliding_window == "masked" or row.linear_attention) and cache_kind in ("static", "offloaded_static"):
        raise ValueError(f"{label} on {type(llm).__name__}: the static cache's sliding or linear-attention layers "
                         f"are not held per slot here (tome_plus keeps every slot and masks a window): use the default "
                         f"dynamic cache")
    return llm


def prepare_features(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
    """A vision method on the image features, before the language model's first layer."""
    llm = check_decoder(model, method_at(method, "features"), "attention" if "attn" in reducer.needs else "features")
    kind, value = config.budget
    if kind not in ("tokens", "keep", "r") or isinstance(value, (list, tuple)):
        raise ValueError(f"site='features' reduces once per image (or video): give tokens= (kept per image), keep= "
                         f"(a fraction) or r= (removed per image) as one number, not {kind}={value!r}")
    if config.trace_source:
        raise ValueError("trace_source is not recorded at site='features'; inspect(model).llm_positions names the "
                         "position of every token kept")
    if getattr(config, "layers", None) is not None:
        raise ValueError("layers= names blocks of a vision encoder; site='features' reduces once, before the "
                         "language model")
    if config.positions == "packed" and decoders.decoder_adapter(llm).rotary != "1d":
        raise ValueError(f"positions='packed' renumbers 1-D rotary positions; {type(llm).__name__}'s M-RoPE "
                         f"positions (temporal, height, width) are not packed yet: use positions='kept'")
    if kind == "tokens" and count_known(model):  # refused here, as timm refuses; else warned at the forward
        tokens_per_image(model, value)
    return PatchInfo(method=method, config=config, reducer=reducer, depth=len(llm.layers), n_prefix=0,
                     has_cls=False, cost=no_cost, parts=VlmParts(site="features"))


def prepare_llm(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
    """A method that prunes inside the language model (ATP, FastV), with the tower's own method if
    asked (ATP)."""
    llm = check_decoder(model, method_at(method, "llm"))
    if config.positions == "packed" and decoders.decoder_adapter(llm).rotary != "1d":
        raise ValueError(f"positions='packed' renumbers 1-D rotary positions; {type(llm).__name__}'s M-RoPE "
                         f"positions (temporal, height, width) are not packed yet: use positions='kept'")
    reducer.sites(len(llm.layers))  # the layers its options name, against the depth
    tower_info = prepare_tower_method(model, config.tower) if getattr(config, "tower", None) is not None else None
    # where every image puts the same count into the LLM, a `tokens=` budget is checked against it now
    counted = config.tokens if reducer.tokens_counted else None  # SparseVLM's names a setting
    per_image = tokens_per_image(model, counted or 0, tower_info) if count_known(model) else None
    info = PatchInfo(method=method, config=config, reducer=reducer, depth=len(llm.layers), n_prefix=0,
                     has_cls=False, cost=no_cost,
                     parts=VlmParts(site="llm", tower=tower_info, tokens_checked=per_image is not None))
    info.modules = reducer.prepare(llm, info, per_image)
    return info


def prepare_tower_method(model: nn.Module, options: dict) -> PatchInfo:
    """The tower's own record where an LLM method asks for a vision method in the tower too
    (ATP's `tower={"method": "tome", "r": 8}`)."""
    options = dict(options)
    tower_cls = get_method(options.pop("method"))
    if tower_cls.target == "llm":
        raise ValueError(f"tower method {tower_cls.name!r} does not run in a vision tower")
    tower_reducer = tower_cls(tower_cls.config_class(**options))
    tower_reducer.for_family(hf_clip.KIND)
    tower_info = hf_clip.prepare(tower(model), tower_reducer, tower_reducer.config, tower_cls.name,
                                 reduce_depth=feature_depth(model))
    tower_info.backend = hf_clip.__name__  # found on the tower's encoder: a tower record
    return tower_info


def install(model: nn.Module, info: PatchInfo) -> None:
    """Swap in the reducing classes of the site: the tower's, or the language model's decoder loop
    (`llm.decoder.PruningDecoder`) and routed attention, with the tower's own method if any. The
    method's trainable part (ATP's modules) stays on the record (`info.modules`), off the model's
    module tree: HF's `save_pretrained`, weight init and checks see the unpatched weights."""
    if info.parts.site == "tower":
        hf_clip.install(tower(model), info)
    elif in_llm(info):
        if info.parts.tower is not None:
            hf_clip.install(tower(model), info.parts.tower)
            adopt(info, info.parts.tower)  # unpatch and refresh of the model cover the tower
        llm = model.model.language_model
        swap_class(llm, PruningDecoder, info)
        tag(llm, info)
        for layer in llm.layers:  # the decoder routes their attention (`llm.attention.routed_attention`)
            if hasattr(layer, "self_attn"):  # not Qwen3.5's linear-attention layers
                swap_class(layer.self_attn, RoutedAttention, info)
