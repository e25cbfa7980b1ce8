"""What one image puts into a vision-language model's language model, and the vision tower it
comes from.

LLaVA-1.5 and VipLLaVA put one fixed-size run of placeholders per image into the prompt: the
tower's tokens for an image of a given size less the class token the feature selection drops
(`image_placeholders`), and after a tower method fewer (`image_counts`: unpatched and reduced).
The packed families (`families.FAMILIES` rows with `packed`: LLaVA-NeXT, LLaVA-NeXT-Video,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) give each image a run of its own length, so nothing reduces
in their towers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn

from ..backends import hf_clip
from ..backends.base import PatchInfo, get_info
from .families import packed, tower_module


def count_known(model: nn.Module) -> bool:
    """Whether every image puts a count into the LLM that is known before any forward: an unpacked
    model with a tower tome_plus reads (CLIP, SigLIP); elsewhere `tokens=` is checked per image."""
    if packed(model):
        return False
    return hf_clip.matches(tower_module(model))


def select_strategy(config, strategy: Optional[str] = None) -> str:
    """"default" drops the class token from the features, "full" keeps it (VipLlava always drops
    it); `config`: the LLaVA model's."""
    return strategy or getattr(config, "vision_feature_select_strategy", None) or "default"


def tower(model: nn.Module) -> nn.Module:
    """The vision tower of the LLaVA model (or of its inner `LlavaModel`)."""
    vision = tower_module(model)
    if not hf_clip.matches(vision):
        raise TypeError(f"the vision tower is {type(vision).__name__}; tome_plus supports CLIP and SigLIP towers")
    return vision


def feature_depth(model: nn.Module, layer=None) -> int:
    """How many tower layers feed the image features (`hidden_states[i]` is layer i-1's output)."""
    layer = model.config.vision_feature_layer if layer is None else layer
    return layers_feeding(hf_clip.depth(tower(model)), layer)


def layers_feeding(depth: int, layer) -> int:
    """How many of a `depth`-layer tower's layers feed the features read at `layer` (an index of
    its hidden states, or a list of them); also the vLLM plugin's, from a config."""
    n_states = depth + 1
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers or any(not -n_states <= i < n_states for i in layers):
        raise ValueError(f"vision_feature_layer {layer!r} is outside the tower's {n_states} hidden states")
    # several feature layers are concatenated token by token: reduce only before the first
    return min(i % n_states for i in layers)


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
