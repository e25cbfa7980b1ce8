"""HF transformers backend: LLaVA (`LlavaForConditionalGeneration`, `VipLlavaForConditionalGeneration`
and their subclasses: one fixed-size image-token run per image).

The vision tower (CLIP or SigLIP) reduces through `hf_clip`; only the layers that feed the image
features (`vision_feature_layer`, e.g. -2 of 24: the first 23) reduce, so no work is spent on a
reduction nobody reads. The model itself then makes the fewer image tokens fit the prompt: a
prompt from the unchanged processor holds the unpatched number of image placeholders per image;
before anything runs, each image's placeholder run is cut to the reduced count, and
`input_ids` / `inputs_embeds`, `attention_mask`, `position_ids` and `labels` are cut with it
(rows re-padded on the side the batch was padded on; position ids renumbered as for a prompt
with fewer placeholders). `generate` does this once for the prompt (left-padded, as generation
needs), counts `max_length` / `min_length` in the caller's tokens, and hands back the caller's own
prompt in front of the new tokens, so slicing the output at the prompt length works as before. A
later turn that passes the cache back with the whole conversation is cut the same way. Prompts
already cut to the reduced count pass unchanged. The inner `LlavaModel` is patched alike, so a call
of `model.model(...)` or one with precomputed `mm_encoder_outputs` fits too.

That is the `tower` site. At the `features` and `llm` sites (every family here, `SITES`) the
prompt stays whole and the language model reduces inside (`hf_llm`); this module tells it which
tokens are visual and where each image's run is (`llm_scope`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from transformers import (DynamicCache, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                          LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLForConditionalGeneration, VipLlavaForConditionalGeneration)

from ..methods.base import ReductionConfig, Reducer
from . import base, hf_clip, hf_llm
from .base import PatchInfo, adopt, attach, get_info, original_class, swap_class, tag

KIND = "hf"
HEADS = False  # a generative model: no classifier head to replace
LLM_METHODS = True  # methods that prune inside the language model (ATP) run here
FAMILY = ("HF transformers LlavaForConditionalGeneration, VipLlavaForConditionalGeneration (the vision tower "
          "reduces, the LLM gets fewer image tokens, or the LLM prunes: atp, fastv); "
          "LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration, "
          "LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration "
          "(the image features reduce: tome, pitome, zero_tprune; or the LLM prunes: atp, fastv)")
MODELS = (LlavaForConditionalGeneration, VipLlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
          LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration,
          Qwen2_5_VLForConditionalGeneration)
# models whose image placeholder runs each have a length of their own, so nothing reduces in the
# tower (site="features" or "llm" instead):
# anyres (crops' grids packed, unpadded, with newline tokens; OneVision's videos pooled per
# frame), Qwen2-VL and Qwen2.5-VL (native resolution, a 2 x 2 patch merger, M-RoPE positions)
_ANYRES = "packs each image's tower grids (anyres crops, unpadded, with newline tokens)"
_QWEN = "merges 2 x 2 patches after its tower, whose windows and rotary positions need the full grid"
PACKED = {"llava_next": _ANYRES, "llava_next_video": _ANYRES + " and pools each video frame",
          "llava_onevision": _ANYRES + " and pools each video frame", "qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN}
model_name = base.model_name  # HF's `config._name_or_path`
# where a vision-language model reduces: the tower's layers, the image features before the LLM,
# or between the LLM's layers
SITES = ("tower", "features", "llm")
KV = True  # the language model's cache can follow a KV policy (`tome_plus.kv`)


@dataclass(eq=False)
class LlavaParts:
    """What a LLaVA patch keeps beyond the shared record (`PatchInfo.parts`). With a tower method
    the shared record is the tower's (`hf_clip.prepare`); with ATP it is ATP's, and the tower's
    own record, if the tower reduces too, is `tower`."""

    tower: Optional[PatchInfo] = None
    site: Optional[str] = "tower"  # where the method reduces: "tower", "features" or "llm" (`SITES`); None: no method
    # the last forward, for `inspect` (never read by a forward; not pickled)
    image_tokens: Optional[torch.Tensor] = None  # [B] image tokens per sample the LLM last received
    llm_kept: Optional[torch.Tensor] = None  # ATP, FastV: [sites, B] visual tokens each pruning site kept
    llm_positions: Optional[List[torch.Tensor]] = None  # ATP, FastV: per site [B, K] position ids kept (-1: pad)
    llm_newlines: Optional[torch.Tensor] = None  # the features site: [B] newline tokens kept, never reduced
    # a `tokens=` budget needs no more checks: checked at `patch` where every image's count is known, or
    # found above an image's count in a forward and warned of (`hf_llm.warn_tokens_once`)
    tokens_checked: bool = False

    def __getstate__(self) -> dict:
        return dict(self.__dict__, image_tokens=None, llm_kept=None, llm_positions=None, llm_newlines=None)


def last_forward(info: PatchInfo) -> Tuple[Optional[Any], Dict[str, Any]]:
    """The tower's last state (the layers that reduced) and LLaVA's own `Inspection` fields."""
    parts = info.parts
    state = info.last_state if parts.tower is None else parts.tower.last_state
    return state, dict(image_tokens=parts.image_tokens, llm_kept=parts.llm_kept, llm_positions=parts.llm_positions,
                       llm_newlines=parts.llm_newlines)


def matches(model: nn.Module) -> bool:
    return isinstance(model, MODELS)


def packed(model: nn.Module) -> bool:
    """A model whose image runs each have a length of their own (`PACKED`; `model` or its inner
    model): nothing reduces in its tower."""
    return model.config.model_type in PACKED


def count_known(model: nn.Module) -> bool:
    """Whether every image puts a count into the LLM that is known before any forward: an unpacked
    model with a tower tome_plus reads (CLIP, SigLIP); elsewhere `tokens=` is checked per image."""
    if packed(model):
        return False
    return hf_clip.matches(model.model.vision_tower if hasattr(model, "model") else model.vision_tower)


def select_strategy(config, strategy: Optional[str] = None) -> str:
    """"default" drops the class token from the features, "full" keeps it (VipLlava always drops
    it); `config`: the LLaVA model's."""
    return strategy or getattr(config, "vision_feature_select_strategy", None) or "default"


def tower(model: nn.Module) -> nn.Module:
    """The vision tower of the LLaVA model (or of its inner `LlavaModel`)."""
    vision = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    if not hf_clip.matches(vision):
        raise TypeError(f"the vision tower is {type(vision).__name__}; tome_plus supports CLIP and SigLIP towers")
    return vision


def feature_depth(model: nn.Module, layer=None) -> int:
    """How many tower layers feed the image features (`hidden_states[i]` is layer i-1's output)."""
    layer = model.config.vision_feature_layer if layer is None else layer
    n_states = hf_clip.depth(tower(model)) + 1
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers or any(not -n_states <= i < n_states for i in layers):
        raise ValueError(f"vision_feature_layer {layer!r} is outside the tower's {n_states} hidden states")
    # several feature layers are concatenated token by token: reduce only before the first
    return min(i % n_states for i in layers)


def depth(model: nn.Module) -> int:
    """The tower's depth; for a model only the LLM prunes in (`packed`), the LLM's."""
    if packed(model):
        return len(model.model.language_model.layers)
    return hf_clip.depth(tower(model))


def default_tokens(model: nn.Module) -> int:
    """Tokens entering the tower for an image of its configured size (0 where images have no one
    count: `packed`, where nothing is scheduled)."""
    return 0 if packed(model) else hf_clip.default_tokens(tower(model))


def default_site(model: nn.Module, reducer: Union[Reducer, Type[Reducer]]) -> str:
    """The best site the model allows the method: in the LLM for an LLM method; for a vision
    method the tower where the projector takes any count (the tower's layers get cheaper too),
    else the image features."""
    if reducer.target == "llm":
        return "llm"
    return "features" if packed(model) else "tower"


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
    if site == "tower" and packed(model):
        raise ValueError(f"{name} {PACKED[model.config.model_type]}: a method in the vision tower would break that. "
                         f"On this model reduce the image features (site='features': "
                         f"{', '.join(methods_at('features'))}) or prune inside the language model "
                         f"({', '.join(map(repr, methods_at('llm')))})")
    if site not in reducer.vlm_sites:
        raise ValueError(f"site={site!r} runs {', '.join(methods_at(site))}, not {reducer.name!r}")
    return site


def methods_at(site: str) -> List[str]:
    """The registered methods that declare `site` among their `vlm_sites`."""
    from ..methods import get_method, method_names

    return [name for name in method_names() if site in get_method(name).vlm_sites]


def prepare(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str,
            site: Optional[str] = None) -> PatchInfo:
    if model.config.image_token_id is None:
        raise ValueError("the config has no image_token_id: the image placeholders cannot be found")
    site = check_site(model, reducer, site)
    if site == "tower":
        vision = tower(model)
        info = hf_clip.prepare(vision, reducer, config, method, reduce_depth=feature_depth(model))
        info.parts = LlavaParts()
        return info
    if site == "features":
        return prepare_features(model, reducer, config, method)
    return prepare_llm(model, reducer, config, method)


def check_decoder(model: nn.Module, label: str) -> nn.Module:
    """The language model, if its layers can run with tokens pruned between them (refused by name
    otherwise); the model's generation config must keep the dynamic cache."""
    llm = model.model.language_model
    if not hf_llm.matches_decoder(llm):
        raise TypeError(f"the language model is {type(llm).__name__}; {label} supports "
                        f"{', '.join(hf_llm.DECODERS)} (without a sliding window in use)")
    cache_kind = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if cache_kind not in (None, "dynamic"):
        raise ValueError(f"the model's generation_config asks for cache_implementation={cache_kind!r}; {label} keeps "
                         f"a different number of tokens per instance in each layer's cache, which only the dynamic "
                         f"cache can hold: set it to None (or 'dynamic') first")
    hf_llm.mask_builder(llm.config._attn_implementation)  # a backend whose masks cannot be built: refused now
    return llm


def prepare_features(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
    """A vision method on the image features, before the language model's first layer."""
    llm = check_decoder(model, hf_llm.method_at(method, "features"))
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
    if kind == "tokens" and count_known(model):  # refused here, as timm refuses; else warned at the forward
        tokens_per_image(model, value)
    return PatchInfo(method=method, config=config, reducer=reducer, depth=len(llm.layers), n_prefix=0,
                     has_cls=False, cost=no_cost, parts=LlavaParts(site="features"))


def prepare_llm(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
    """A method that prunes inside the language model (ATP, FastV), with the tower's own method if
    asked (ATP)."""
    llm = check_decoder(model, hf_llm.method_at(method, "llm"))
    reducer.sites(len(llm.layers))  # the layers its options name, against the depth
    tower_info = prepare_llm_tower(model, config.tower) if getattr(config, "tower", None) is not None else None
    # where every image puts the same count into the LLM, a `tokens=` budget is checked against it now
    per_image = tokens_per_image(model, config.tokens or 0, tower_info) if count_known(model) else None
    info = PatchInfo(method=method, config=config, reducer=reducer, depth=len(llm.layers), n_prefix=0,
                     has_cls=False, cost=no_cost,
                     parts=LlavaParts(site="llm", tower=tower_info, tokens_checked=per_image is not None))
    info.modules = reducer.prepare(llm, info, per_image)
    return info


def prepare_llm_tower(model: nn.Module, options: dict) -> PatchInfo:
    """The tower's own record where an LLM method asks for a vision method in the tower too
    (ATP's `tower={"method": "tome", "r": 8}`)."""
    from ..methods import get_method

    options = dict(options)
    tower_cls = get_method(options.pop("method"))
    if tower_cls.target == "llm":
        raise ValueError(f"tower method {tower_cls.name!r} does not run in a vision tower")
    tower_reducer = tower_cls(tower_cls.config_class(**options))
    tower_reducer.for_family(KIND)
    tower_info = hf_clip.prepare(tower(model), tower_reducer, tower_reducer.config, tower_cls.name,
                                 reduce_depth=feature_depth(model))
    tower_info.backend = hf_clip.__name__  # found on the tower's encoder: a tower record
    return tower_info


def tokens_per_image(model: nn.Module, tokens: int, tower_info: Optional[PatchInfo] = None) -> int:
    """The image tokens one image of the tower's configured size puts into the LLM (after the
    tower's own reduction, `tower_info`, if any), where a `tokens=N` budget per image is counted;
    N above it is refused (LLaVA-1.5 style models, whose every image has that count)."""
    vision = tower(model)
    n_input = tower_tokens(vision.config, None, hf_clip.has_cls(vision))
    removed = sum(tower_info.removals(n_input, strict=True)) if tower_info is not None else 0
    per_image = n_input - removed - dropped(model.config)
    if tokens > per_image:
        raise ValueError(f"tokens={tokens} is more than the {per_image} image tokens one image puts into the LLM")
    return per_image


def no_cost(n_tokens: int) -> None:
    """ATP's counts are decided per instance at run time: there is no schedule to solve."""
    return None


def check_budget(model: nn.Module, info: PatchInfo) -> None:
    if info.reducer is None:  # a KV policy alone
        return
    record = tower_of(info)
    if record is not None:
        record.removals(default_tokens(model), strict=True)


def in_llm(info: PatchInfo) -> bool:
    """Whether the patched language model reduces (ATP and FastV between its layers, a vision
    method on the features before its first), not the tower."""
    return info.parts.site in ("features", "llm")


def prepare_kv(model: nn.Module, kv, info: Optional[PatchInfo] = None) -> PatchInfo:
    """The KV policy `kv` for the language model, alone (`info` None) or with the patch `info`."""
    from ..kv import engine
    engine.check_decoder(model.model.language_model, kv.name)
    if info is None:
        info = PatchInfo(method=None, config=None, reducer=None, depth=len(model.model.language_model.layers),
                         n_prefix=0, has_cls=False, cost=no_cost, parts=LlavaParts(site=None))
    info.kv = kv
    return info


def install(model: nn.Module, info: PatchInfo) -> None:
    if info.parts.site == "tower":
        hf_clip.install(tower(model), info)
    elif in_llm(info):
        if info.parts.tower is not None:
            hf_clip.install(tower(model), info.parts.tower)
            adopt(info, info.parts.tower)  # unpatch and refresh of the model cover the tower
        llm = model.model.language_model
        swap_class(llm, hf_llm.PruningDecoder, info)
        tag(llm, info)
        for layer in llm.layers:  # the decoder routes their attention (`hf_llm.routed_attention`)
            swap_class(layer.self_attn, hf_llm.RoutedAttention, info)
        if info.modules is not None:
            attach(model, MODULES_ATTR, info.modules, info)
    if info.kv is not None:
        from ..kv import engine
        engine.install(model.model.language_model, info)
    swap_class(model.model, FittingInner, info)
    tag(model.model, info)
    swap_class(model, FittingLlava, info)


MODULES_ATTR = "tome_plus_atp"  # where a patched model holds its ATP modules (their state_dict prefix)


def tower_record(model: nn.Module) -> Optional[PatchInfo]:
    """The vision tower's patch record (None where the tower is not patched)."""
    return tower_of(get_info(model))


def tower_of(info: PatchInfo) -> Optional[PatchInfo]:
    """The tower's record within a LLaVA patch record: the record itself (a tower method), or
    ATP's `parts.tower` (None where the tower is not patched)."""
    return info if info.parts.site == "tower" else info.parts.tower


def image_counts(model: nn.Module, n_pixels: Optional[Tuple[int, int]] = None, feature_layer=None,
                 strategy: Optional[str] = None) -> Tuple[int, int]:
    """(unpatched, reduced) image tokens one image of `n_pixels` (H, W; default: the tower's
    configured size) puts into the LLM."""
    vision, info = tower(model), tower_record(model)
    n_input = tower_tokens(vision.config, n_pixels, hf_clip.has_cls(vision))
    depth = feature_depth(model, feature_layer)
    if (info is not None and feature_layer is not None and not isinstance(feature_layer, int)
            and depth < (info.reduce_depth or 0)):
        raise ValueError(f"vision_feature_layer {feature_layer!r} reads layers the tower reduces in (it was patched "
                         f"for {model.config.vision_feature_layer!r}); set it in the config and patch again")
    removed = sum(info.removals(n_input)[:depth]) if info is not None else 0
    drop = dropped(model.config, strategy)
    return n_input - drop, n_input - removed - drop


def tower_tokens(vision_config, n_pixels: Optional[Tuple[int, int]], has_cls: bool) -> int:
    """Tokens entering the tower's first layer for an image of `n_pixels` (H, W; None: the
    configured size)."""
    patch = vision_config.patch_size
    height, width = n_pixels if n_pixels is not None else (vision_config.image_size,) * 2
    return (height // patch) * (width // patch) + int(has_cls)


def dropped(config, strategy: Optional[str] = None) -> int:
    """Tower tokens the feature selection leaves out: the first under "default"."""
    return 1 if select_strategy(config, strategy) == "default" else 0


def image_placeholders(config, n_pixels: Optional[Tuple[int, int]] = None, strategy: Optional[str] = None) -> int:
    """Image tokens one image puts into the unpatched model's LLM: as many placeholders as the
    processor inserts per image, for a LLaVA `config` (CLIP's tower has a class token, SigLIP's
    none)."""
    vision = config.vision_config
    has_cls = vision.model_type == "clip_vision_model"
    return tower_tokens(vision, n_pixels, has_cls) - dropped(config, strategy)


def image_mask(model: nn.Module, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """`[B, L]` True at the image placeholders (by id, or by embedding as HF does for embeds)."""
    image_id = model.config.image_token_id
    if input_ids is not None:
        return input_ids == image_id
    image_embed = model.get_input_embeddings()(torch.tensor(image_id, device=inputs_embeds.device))
    return (inputs_embeds == image_embed).all(-1)


def fit_prompt(is_image: torch.Tensor, n_full: int, n_reduced: int, n_images: Optional[int],
               tensors: Dict[str, Optional[torch.Tensor]], left: Optional[bool] = None) -> Dict[str, Any]:
    """Cut every image's placeholder run from `n_full` to its first `n_reduced` tokens.

    `tensors` maps "input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels" to
    `[B, L, ...]` tensors or None; returns them cut alike (rows re-padded: on the left when `left`,
    else on the side the batch was padded on), with "image_tokens" (`[B]`, what each row keeps),
    "removed" (how much shorter the batch became) and, where something was cut, "moved": `(rows,
    columns, new columns)` of every token kept (`cut[rows, new] = full[rows, columns]`). A prompt already at `n_reduced` per image passes
    unchanged; any other count raises. `n_images`: images given with the prompt (None: not known,
    e.g. a later turn with the cache; then every row must hold whole runs).
    """
    per_row = is_image.sum(dim=1).tolist()
    total = sum(per_row)
    out = dict(tensors, image_tokens=is_image.sum(dim=1), removed=0, has_images=total > 0)
    whole = lambda n: all(c % n == 0 for c in per_row)
    if n_full == n_reduced or total == 0:
        return out
    if n_images is not None:  # the images are known: the total says which count the prompt uses
        if total == n_images * n_reduced and whole(n_reduced):
            return out
        cut = total == n_images * n_full and whole(n_full)
    else:  # a later turn: the conversation as the caller has it holds whole processor runs
        if not whole(n_full) and whole(n_reduced):
            return out
        cut = whole(n_full)
    if not cut:
        images = f"{n_images} image(s)" if n_images is not None else "the images of this prompt"
        raise ValueError(f"the prompt holds {per_row} image tokens per sample for {images}; expected {n_full} per "
                         f"image (as the model's processor inserts them) or {n_reduced} (already reduced)")
    rank = is_image.long().cumsum(dim=1) - 1
    keep = ~is_image | (rank % n_full < n_reduced)  # the first n_reduced of every image's run
    counts = keep.sum(dim=1)
    length = int(counts.max())
    mask = tensors.get("attention_mask")
    if left is None:  # keep the batch's padding side (left if some row starts with padding)
        left = mask is not None and bool((mask[:, 0] == 0).any())
    start = (length - counts) if left else torch.zeros_like(counts)
    dest = start.unsqueeze(1) + keep.long().cumsum(dim=1) - 1
    rows, cols = keep.nonzero(as_tuple=True)
    new_cols = dest[rows, cols]

    def cut_tensor(t: Optional[torch.Tensor], fill) -> Optional[torch.Tensor]:
        if t is None:
            return None
        result = t.new_full((t.shape[0], length) + tuple(t.shape[2:]), fill)
        result[rows, new_cols] = t[rows, cols]
        return result

    if mask is None and bool((counts != length).any()):
        mask = torch.ones_like(is_image, dtype=torch.long)  # rows now differ in length: say where the pads are
    positions = tensors.get("position_ids")
    if positions is not None:
        if positions.dim() != 2:
            raise ValueError(f"position_ids of shape {tuple(positions.shape)}: tome_plus cuts [batch, length] ones")
        # as if the prompt had held fewer placeholders: later tokens move up by the cut ones before them
        positions = positions - (is_image & ~keep).long().cumsum(dim=1)
    out.update(input_ids=cut_tensor(tensors.get("input_ids"), tensors.get("pad_id", 0)),
               inputs_embeds=cut_tensor(tensors.get("inputs_embeds"), 0.0), attention_mask=cut_tensor(mask, 0),
               position_ids=cut_tensor(positions, 0), labels=cut_tensor(tensors.get("labels"), -100),
               image_tokens=(is_image & keep).sum(dim=1), removed=is_image.shape[1] - length,
               moved=(rows, cols, new_cols))
    return out


FITTED = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels")


def argument_getter(args: Dict[str, Any], extra: Dict[str, Any]) -> Callable[[str], Any]:
    """`get(name)`: a call's argument by name (`args`), else from its **kwargs (`extra`), else None."""
    return lambda name: args.get(name, extra.get(name))


def cache_argument(get: Callable[[str], Any]):
    """The cache a call was given (`cache`, or `past_key_values` as older callers name it)."""
    return get("cache") if get("cache") is not None else get("past_key_values")


def fit_call(model: nn.Module, args: Dict[str, Any], extra: Dict[str, Any], left: Optional[bool] = None
             ) -> Optional[Dict[str, Any]]:
    """Fit the prompt of one forward/generate call (its arguments by name, `extra` its **kwargs)
    in place; returns `fit_prompt`'s result, or None where there was nothing to fit.

    Public: besides the patched forward and generate, the lmms-eval model
    (`tome_plus.integrations.lmms_eval`) calls it after a forward, on a copy of that call's
    arguments, for `"moved"` (where each kept token went), to give the logits back at the caller's
    positions."""
    get = argument_getter(args, extra)
    ids, embeds = get("input_ids"), get("inputs_embeds")
    if ids is None and embeds is None:
        return None
    pixels, encoded = get("pixel_values"), (get("mm_encoder_outputs") or {}).get("image")
    cache = cache_argument(get)
    fitted = _fit(model, ids, embeds, pixels, encoded, cache, get, left)
    if fitted is not None:
        for name in FITTED:
            if fitted[name] is not None:
                (args if name in args else extra)[name] = fitted[name]
    return fitted


def check_cache(args: Dict[str, Any], extra: Dict[str, Any]) -> None:
    """A forward's attention mask must cover the cache and the new tokens: a mask grown from the
    processor's (uncut) one would silently shift every position."""
    get = argument_getter(args, extra)
    cache = cache_argument(get)
    mask, tokens = get("attention_mask"), get("input_ids") if get("input_ids") is not None else get("inputs_embeds")
    if not isinstance(cache, DynamicCache) or mask is None or tokens is None or cache.get_seq_length() == 0:
        return
    from ..kv.engine import PrunedLayer
    if any(isinstance(layer, PrunedLayer) for layer in cache.layers):
        return  # a KV policy keeps (or pruned) it: its length says nothing about the conversation
    if mask.shape[1] != cache.get_seq_length() + tokens.shape[1]:
        raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, but the cache holds {cache.get_seq_length()} "
                         f"and {tokens.shape[1]} are new: the cache holds the prompt as tome_plus cut it; pass the "
                         f"whole conversation to generate (its images are cut the same way), or cut the mask with "
                         f"tome_plus.backends.hf_llava.fit_prompt")


def _fit(model, ids, embeds, pixels, encoded, cache, get, left) -> Optional[Dict[str, Any]]:
    layer, strategy = get("vision_feature_layer"), get("vision_feature_select_strategy")
    if packed(model):  # only the LLM prunes: the prompt stays as it is
        tensors = {name: get(name) for name in FITTED}
        return fit_prompt(image_mask(model, ids, embeds), 0, 0, None, tensors, left)
    if pixels is not None:
        n_full, n_reduced = image_counts(model, tuple(pixels.shape[-2:]), layer, strategy)
        n_images = pixels.shape[0]
    elif encoded is not None:  # features made earlier (by this patched tower): their length is the count
        features = encoded.pooler_output
        n_full, n_reduced = image_counts(model, None, layer, strategy)[0], features[0].shape[0]
        n_images = len(features)
    elif cache is not None and (ids if ids is not None else embeds).shape[1] > 1:
        # a later turn: the whole conversation again, whose images the cache holds cut
        n_full, n_reduced = image_counts(model, None, layer, strategy)
        n_images = None
    else:
        return None
    tensors = {name: get(name) for name in FITTED}
    tensors["pad_id"] = pad_token_id(model)
    return fit_prompt(image_mask(model, ids, embeds), n_full, n_reduced, n_images, tensors, left)


def pad_token_id(model: nn.Module) -> int:
    text = getattr(model.config, "text_config", None)
    for value in (getattr(text, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return value
    return 0


# every forward (each decoding step) binds its arguments: look each signature up once
_signature = functools.lru_cache(maxsize=None)(inspect.signature)


def bind(method, self: nn.Module, args, kwargs) -> inspect.BoundArguments:
    """`args`/`kwargs` of a call bound to the original `method`'s parameters (by name from here on)."""
    return _signature(method).bind(self, *args, **kwargs)


def keywords(bound: inspect.BoundArguments) -> Dict[str, Any]:
    """A bound call's arguments, every one by name (HF's decorators add config defaults by name,
    which a positional replay would collide with)."""
    out: Dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # without self
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"unexpected positional arguments {value!r}")
        else:
            out[name] = value
    return out


def var_kwargs(bound: inspect.BoundArguments) -> Dict[str, Any]:
    """The **kwargs part of a bound call (a dict, possibly empty; edited in place)."""
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return bound.arguments.setdefault(name, {})
    return {}


class _SignatureOfOriginal:
    """Patched classes report the original `forward` signature: transformers reads it (e.g. to
    pass `logits_to_keep` and `mm_encoder_outputs` in `generate`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        parents = cls.__dict__.get("_tome_plus_parents")
        if parents is not None:
            mixin_forward = parents[0].forward
            cls.forward = functools.wraps(parents[1].forward)(lambda self, *a, **k: mixin_forward(self, *a, **k))


def fitted_call(model: nn.Module, args, kwargs) -> inspect.BoundArguments:
    """A forward's arguments bound by name, the prompt fitted (`inspect` told how many image tokens
    it carries) and the cache checked: what both patched forwards do first."""
    bound = bind(original_class(model).forward, model, args, kwargs)
    fitted = fit_call(model, bound.arguments, var_kwargs(bound))
    if fitted is not None and fitted["has_images"]:
        get_info(model).parts.image_tokens = fitted["image_tokens"]
    if get_info(model).parts.site != "features":  # there the prompt stays whole: its mask covers the conversation
        check_cache(bound.arguments, var_kwargs(bound))
    return bound


class FittingInner(_SignatureOfOriginal):
    """Mixin for the inner `LlavaModel`: a prompt with the processor's placeholder count fits."""

    def forward(self, *args, **kwargs):
        bound = fitted_call(self, args, kwargs)
        info = get_info(self)
        if not in_llm(info):
            return super().forward(**keywords(bound))
        call = hf_llm.CALL.get()
        scope = llm_scope(self, bound.arguments, var_kwargs(bound), call)
        if scope.has_visual:  # videos' tokens too
            info.parts.image_tokens = scope.visual.sum(dim=1)
        token = hf_llm.SCOPE.set(scope)
        try:
            out = super().forward(**keywords(bound))
        finally:
            hf_llm.SCOPE.reset(token)
        if scope.kept:
            info.parts.llm_kept, info.parts.llm_positions = torch.stack(scope.kept), scope.positions
            info.parts.llm_newlines = scope.newlines
        if call.collect is not None:
            call.collect.append(scope)
        return out


def llm_scope(model: nn.Module, args: Dict[str, Any], extra: Dict[str, Any],
              call: "hf_llm.LlmCall") -> "hf_llm.LlmInputs":
    """What ATP and FastV need to know of this forward's tokens: which are visual (image and video
    placeholders), each visual token's SAP grid score (its place in its image's grid; along the
    run where the run is not one grid), and how many images each row holds; with what the caller
    said (`call`: the prompt's length, the answer, soft masks)."""
    get = argument_getter(args, extra)
    ids, embeds = get("input_ids"), get("inputs_embeds")
    visual = image_mask(model, ids, embeds)
    video_id = getattr(model.config, "video_token_id", None)
    if video_id is not None and ids is not None:
        visual = visual | (ids == video_id)
    spatial = torch.zeros(visual.shape, device=visual.device)
    images = torch.zeros(visual.shape[0], dtype=torch.long, device=visual.device)
    if bool(visual.any()) and not packed(model):
        # the grid from what every call path has: this call's pixels where it has them, else the
        # tower's configured size (generate encodes the images first and calls forward without
        # them); where the placeholder runs do not fit that grid, tokens are graded along the run
        pixels = get("pixel_values")
        vision = tower(model).config
        n_pixels = tuple(pixels.shape[-2:]) if pixels is not None else (vision.image_size,) * 2
        n_full, n_run = image_counts(model, n_pixels, get("vision_feature_layer"),
                                     get("vision_feature_select_strategy"))
        grid = (n_pixels[0] // vision.patch_size, n_pixels[1] // vision.patch_size)
        first = n_run - grid[0] * grid[1]  # a class token kept by the "full" strategy comes first
        if n_full == n_run and first in (0, 1):
            table = hf_llm_spatial(grid, first, visual.device)
        else:
            table = hf_llm_spatial((1, n_run), 0, visual.device)
        count = (visual.long().cumsum(dim=1) - 1).clamp(min=0)
        rank = count % n_run
        spatial = torch.where(visual, table[rank], spatial)
        images = (visual.sum(dim=1) + n_run - 1) // n_run  # runs of whole images, adjacent ones too
        runs = torch.where(visual, count // n_run, -1)
    elif bool(visual.any()):
        starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]  # the first token of each run
        images, spatial = starts.sum(dim=1), along_runs(visual, starts)
        runs = torch.where(visual, starts.long().cumsum(dim=1) - 1, -1)
    else:
        runs = None
    answer = call.answer
    if answer is not None and answer.shape != visual.shape:
        answer = None
    return hf_llm.LlmInputs(visual=visual, spatial=spatial, has_visual=bool(visual.any()), images=images,
                            runs=runs, newline=getattr(model, "image_newline", None),
                            soft=call.collect is not None, prompt_length=call.prompt_length, answer=answer)


def along_runs(visual: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """`[B, L]` SAP scores of the visual tokens graded along each placeholder run (a 1 x n grid
    per run of n tokens); 0 elsewhere."""
    run = starts.long().cumsum(dim=1) * visual  # run number (from 1) of each visual token
    spatial = torch.zeros(visual.shape, device=visual.device)
    for b in range(visual.shape[0]):
        for r in range(1, int(run[b].max()) + 1):
            at = (run[b] == r).nonzero().squeeze(1)
            spatial[b, at] = hf_llm_spatial((1, len(at)), 0, visual.device)
    return spatial


def hf_llm_spatial(grid: Tuple[int, int], first: int, device: torch.device) -> torch.Tensor:
    from ..methods.atp import spatial_score
    table = spatial_score(grid, device)
    return torch.cat([table.new_ones(first), table]) if first else table


class FittingLlava(_SignatureOfOriginal):
    """Mixin for `LlavaForConditionalGeneration` (and VipLlava): prompts with the processor's
    placeholder count fit, in `forward` (labels too) and in `generate`."""

    def forward(self, *args, **kwargs):
        bound = fitted_call(self, args, kwargs)
        labels = bound.arguments.get("labels", var_kwargs(bound).get("labels"))
        with hf_llm.calling(answer=labels != -100 if labels is not None else None):
            return super().forward(**keywords(bound))

    def generate(self, *args, **kwargs):
        bound = bind(original_class(self).generate, self, args, kwargs)
        extra = var_kwargs(bound)
        config = bound.arguments.get("generation_config")
        beams = extra.get("num_beams", getattr(config, "num_beams", None) or self.generation_config.num_beams)
        info = get_info(self)
        if in_llm(info) and (beams or 1) > 1:
            raise ValueError(f"{hf_llm.method_at(info.method, info.parts.site)} keeps a different set of tokens per "
                             f"instance in the cache, which beam search would reorder; generate with num_beams=1 "
                             f"(greedy or sampling)")
        ids = bound.arguments.get("inputs")
        if ids is None:
            ids = extra.get("input_ids")
        elif "input_ids" not in extra:  # fit it under its keyword name, hand it back positionally
            extra["input_ids"] = bound.arguments.pop("inputs")
        fitted = fit_call(self, bound.arguments, extra, left=True)
        prompt = (fitted["input_ids"] if fitted is not None and fitted["input_ids"] is not None else ids)
        with hf_llm.calling(prompt_length=prompt.shape[1] if prompt is not None else None):
            return self._generate(bound, extra, ids, fitted)

    def _generate(self, bound, extra, ids, fitted):
        if fitted is None or fitted["removed"] == 0 and fitted["input_ids"] is ids:
            return super().generate(**keywords(bound))
        # max_length / min_length count the caller's prompt, wherever they are set (an argument,
        # the generation_config passed, the model's own): the cut prompt is `removed` shorter.
        # Given as arguments, they override the config's, as HF's generate merges them
        removed = fitted["removed"]
        config = bound.arguments.get("generation_config") or self.generation_config
        if extra.get("max_new_tokens") is None and config.max_new_tokens is None:
            length = extra.get("max_length", config.max_length)
            if length is not None:
                extra["max_length"] = length - removed
        min_length = extra.get("min_length", config.min_length)
        if min_length:
            extra["min_length"] = max(min_length - removed, 0)
        out = super().generate(**keywords(bound))
        if ids is None:  # from embeddings: generate returns only the new tokens
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = ids.repeat_interleave(sequences.shape[0] // ids.shape[0], dim=0)  # num_return_sequences
        restored = torch.cat([prompt, sequences[:, fitted["input_ids"].shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out
