"""HF transformers backend: LLaVA (`LlavaForConditionalGeneration`, `VipLlavaForConditionalGeneration`
and their subclasses: one fixed-size image-token run per image).

The vision tower (CLIP or SigLIP) reduces through `hf_clip`; only the layers that feed the image
features (`vision_feature_layer`, e.g. -2 of 24: the first 23) reduce, so no work is spent on a
reduction nobody reads. The model itself then makes the fewer image tokens fit the prompt: a
prompt from the unchanged processor holds the unpatched number of image placeholders per image;
before anything runs, each image's placeholder run is cut to the reduced count, and
`input_ids` / `inputs_embeds`, `attention_mask`, `position_ids` and `labels` are cut with it
(rows re-padded on the side the batch was padded on). `generate` does this once for the prompt
and hands back the caller's own prompt in front of the new tokens, so slicing the output at the
prompt length works as before. Prompts already cut to the reduced count pass unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from transformers import LlavaForConditionalGeneration, VipLlavaForConditionalGeneration

from ..methods.base import ReductionConfig, Reducer
from . import hf_clip
from .base import PatchInfo, get_info, swap_class

KIND = "hf"
FAMILY = ("HF transformers LlavaForConditionalGeneration, VipLlavaForConditionalGeneration (the vision tower "
          "reduces, the LLM gets fewer image tokens)")
MODELS = (LlavaForConditionalGeneration, VipLlavaForConditionalGeneration)


def matches(model: nn.Module) -> bool:
    return isinstance(model, MODELS)


def select_strategy(model: nn.Module, strategy: Optional[str] = None) -> str:
    """"default" drops the class token from the features, "full" keeps it (VipLlava always drops it)."""
    return strategy or getattr(model.config, "vision_feature_select_strategy", None) or "default"


def tower(model: nn.Module) -> nn.Module:
    vision = model.model.vision_tower
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
    return hf_clip.depth(tower(model))


def default_tokens(model: nn.Module) -> int:
    return hf_clip.default_tokens(tower(model))


def prepare(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
    vision = tower(model)
    if model.config.image_token_id is None:
        raise ValueError("the config has no image_token_id: the image placeholders cannot be found")
    return hf_clip.prepare(vision, reducer, config, method, reduce_depth=feature_depth(model))


def install(model: nn.Module, info: PatchInfo) -> None:
    hf_clip.install(tower(model), info)
    swap_class(model, ReducingLlava, info)


def image_tokens_per_image(model: nn.Module, pixel_values: torch.Tensor, feature_layer=None,
                           strategy: Optional[str] = None) -> Tuple[int, int]:
    """(unpatched, reduced) image tokens one image of this size puts into the LLM."""
    vision = tower(model)
    patch = vision.config.patch_size
    n_input = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch) + int(hf_clip.has_cls(vision))
    removed = sum(get_info(model).removals(n_input)[:feature_depth(model, feature_layer)])
    drop = 1 if select_strategy(model, strategy) == "default" else 0
    return n_input - drop, n_input - removed - drop


def _padding_left(attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether a batch is left-padded (some row starts with padding), as for generation."""
    return attention_mask is not None and bool((attention_mask[:, 0] == 0).any())


def fit_prompt(model: nn.Module, pixel_values: torch.Tensor, input_ids=None, inputs_embeds=None,
               attention_mask=None, position_ids=None, labels=None, feature_layer=None, strategy=None):
    """Cut every image's placeholder run to the reduced count; returns the five tensors, cut alike.

    A prompt that already has the reduced count passes unchanged. Anything else is an error that
    says what was expected.
    """
    n_full, n_reduced = image_tokens_per_image(model, pixel_values, feature_layer, strategy)
    image_id = model.config.image_token_id
    if input_ids is not None:
        is_image = input_ids == image_id
    else:
        image_embed = model.get_input_embeddings()(torch.tensor(image_id, device=inputs_embeds.device))
        is_image = (inputs_embeds == image_embed).all(-1)
    n_images = pixel_values.shape[0]
    per_row = is_image.sum(dim=1).tolist()
    total = sum(per_row)
    if n_full == n_reduced or total == n_images * n_reduced:
        return input_ids, inputs_embeds, attention_mask, position_ids, labels
    if total != n_images * n_full or any(n % n_full for n in per_row):
        raise ValueError(f"the prompt holds {per_row} image tokens per sample for {n_images} image(s); "
                         f"expected {n_full} per image (as the model's processor inserts them) or "
                         f"{n_reduced} (already reduced)")
    # keep the first n_reduced placeholders of every image's run (runs are n_full long, in order)
    rank = is_image.long().cumsum(dim=1) - 1
    keep = ~is_image | (rank % n_full < n_reduced)
    counts = keep.sum(dim=1)
    length = int(counts.max())
    left = _padding_left(attention_mask)
    start = (length - counts) if left else torch.zeros_like(counts)
    dest = start.unsqueeze(1) + keep.long().cumsum(dim=1) - 1  # new position of every kept token
    rows, cols = keep.nonzero(as_tuple=True)
    new_cols = dest[rows, cols]

    def cut(t: Optional[torch.Tensor], fill) -> Optional[torch.Tensor]:
        if t is None:
            return None
        out = t.new_full((t.shape[0], length) + tuple(t.shape[2:]), fill)
        out[rows, new_cols] = t[rows, cols]
        return out

    pad_id = getattr(model.config.text_config, "pad_token_id", None) or getattr(model.config, "pad_token_id", None) or 0
    if attention_mask is None and bool((counts != length).any()):
        attention_mask = torch.ones_like(is_image, dtype=torch.long)  # rows now differ in length
    if position_ids is not None and position_ids.dim() != 2:
        raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: tome_plus cuts [batch, length] ones")
    return (cut(input_ids, pad_id), cut(inputs_embeds, 0.0), cut(attention_mask, 0), cut(position_ids, 0),
            cut(labels, -100))


class ReducingLlava:
    """Mixin for `LlavaForConditionalGeneration`: prompts with the processor's placeholder count fit."""

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, *args,
                inputs_embeds=None, labels=None, **kwargs):
        if pixel_values is not None:
            input_ids, inputs_embeds, attention_mask, position_ids, labels = fit_prompt(
                self, pixel_values, input_ids, inputs_embeds, attention_mask, position_ids, labels,
                kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy"))
            self._remember_image_tokens(input_ids, inputs_embeds)
        return super().forward(input_ids, pixel_values, attention_mask, position_ids, *args,
                               inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    def generate(self, inputs: Optional[torch.Tensor] = None, **kwargs):
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or (input_ids is None and kwargs.get("inputs_embeds") is None):
            return super().generate(input_ids, **kwargs)
        fitted, embeds, mask, position_ids, _ = fit_prompt(
            self, pixel_values, input_ids, kwargs.pop("inputs_embeds", None), kwargs.pop("attention_mask", None),
            kwargs.pop("position_ids", None), None, kwargs.get("vision_feature_layer"),
            kwargs.get("vision_feature_select_strategy"))
        for name, value in (("inputs_embeds", embeds), ("attention_mask", mask), ("position_ids", position_ids)):
            if value is not None:
                kwargs[name] = value
        out = super().generate(fitted, **kwargs)
        if input_ids is None or fitted is input_ids:
            return out
        # the caller's prompt in front of the new tokens, as the unpatched model returns them
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        restored = torch.cat([input_ids, sequences[:, fitted.shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out

    def _remember_image_tokens(self, input_ids, inputs_embeds) -> None:
        """For `inspect`: image tokens per sample that reach the language model."""
        if input_ids is not None:
            get_info(self).image_tokens = (input_ids == self.config.image_token_id).sum(dim=1)
