"""Qwen2-VL in vLLM with each image's and each video's features reduced, the kept tokens at their
own M-RoPE (t, h, w) positions (positions="kept", as the HF features site places them; the text
after an item continues where it would unreduced).

The count per item is decided before scheduling (the processor's placeholders, from the item's
grid); the positions depend on what is kept, so they are set after the encoder by the hook vLLM's
video pruning (EVS) uses: each kept embedding carries its position in extra channels, and
`recompute_mrope_positions` strips them and writes the positions into the slots each prefill
chunk computes (vLLM's EVS routine is not reused: with two items in a prompt and a chunk boundary
between them it writes the second item at the first one's end). vLLM runs that hook only while the
model config's multimodal pruning switch is on, which it ties to `video_pruning_rate`; a served
model turns the switch on for its own engine (`ReducingMRopeModel.__init__`), images included.

Each item's placeholders must have text on both sides (Qwen's prompts wrap an item in
<|vision_start|> ... <|vision_end|>): two adjacent items would read as one, and after a prompt
that ends on an item decoding would resume after its largest kept position, not its extent.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Sequence

import torch
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import settings as S
from .reduce import ServedModel, reduce_item, reduced_count

DIGITS, BASE = 3, 64  # a position travels as 3 base-64 digits: exact in bf16 (integers to 256) up to 64**3
CHANNELS = 3 * DIGITS  # t, h, w


def grid_positions(t: int, h: int, w: int, t_factor: float, device=None) -> torch.Tensor:
    """`[t * h * w, 3]` M-RoPE positions of an item's merged grid, numbered from 0 in (t, h, w)
    order, the temporal index scaled by `t_factor` (seconds per frame x tokens per second) as
    vLLM's `get_mrope_input_positions` and HF's `get_rope_index` scale it."""
    temporal = (torch.arange(t, dtype=torch.float64, device=device) * t_factor).long()
    return torch.stack([temporal.view(-1, 1, 1).expand(t, h, w),
                        torch.arange(h, device=device).view(1, -1, 1).expand(t, h, w),
                        torch.arange(w, device=device).view(1, 1, -1).expand(t, h, w)], dim=-1).reshape(-1, 3)


def encode(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[n, 3]` non-negative integers as `[n, CHANNELS]` digits in `dtype`."""
    digits = [values // BASE ** i % BASE for i in range(DIGITS)]
    return torch.cat(digits, dim=1).to(dtype)


def decode(channels: torch.Tensor) -> torch.Tensor:
    """`[n, CHANNELS]` digits -> `[3, n]` long (t, h, w)."""
    digits = channels.round().long().view(-1, DIGITS, 3)
    return sum(digits[:, i] * BASE ** i for i in range(DIGITS)).T


def _reduced_replacement(replacement, settings: S.Settings):
    def tokens(item_idx: int):
        ids = replacement(item_idx)
        return ids[:reduced_count(settings, len(ids))]
    return tokens


class ReducedGridPlaceholders:
    """Mixin for Qwen's multimodal processor: with a `tome_plus` entry, an item's placeholders
    are its reduced count (the processor counts them from the item's grid)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = S.read(self.info.get_hf_config())
        if settings is None:
            return updates
        return [dataclasses.replace(u, replacement=_reduced_replacement(u.replacement, settings)) for u in updates]


class ReducingMRopeModel(ServedModel):
    """Mixin for vLLM's Qwen2-VL / Qwen2.5-VL: each item reduced, its kept tokens' positions
    carried in `CHANNELS` extra channels to `recompute_mrope_positions`."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.tome_plus is None:
            return
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config.get_video_pruning_spec() is not None:
            raise ValueError(f"tome_plus: vLLM's video pruning (video_pruning_rate={mm_config.video_pruning_rate}) "
                             f"and tome_plus would both reduce a video's tokens; serve one of them")
        # the runner calls `recompute_mrope_positions` only where pruning is on (a model config's
        # video pruning rate); this engine's config says so for its images and videos too
        mm_config.__dict__["is_multimodal_pruning_enabled"] = functools.partial(bool, True)
        self.supports_multimodal_pruning = True

    def _reduce_grids(self, items: Sequence[torch.Tensor], grids: torch.Tensor,
                      t_factors: Sequence[float]) -> List[torch.Tensor]:
        merge = self.config.vision_config.spatial_merge_size
        out = []
        for x, (t, h, w), t_factor in zip(items, grids.tolist(), t_factors):
            places = grid_positions(t, h // merge, w // merge, t_factor, device=x.device)
            kept, rows = reduce_item(x, self.tome_plus, layer=self.tome_plus_layer, places=places)
            out.append(torch.cat([kept, encode(places[rows], kept.dtype)], dim=1))
        return out

    def _process_image_input(self, image_input):
        items = super()._process_image_input(image_input)
        if self.tome_plus is None:
            return items
        return tuple(self._reduce_grids(items, image_input["image_grid_thw"], [1.0] * len(items)))

    def _process_video_input(self, video_input):
        items = super()._process_video_input(video_input)
        if self.tome_plus is None:
            return items
        # as vLLM's `iter_mm_grid_thw` scales a video's temporal positions (Qwen2-VL: by 1)
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = video_input.get("second_per_grid_ts")
        seconds = [1.0] * len(items) if seconds is None else [float(s) for s in seconds.tolist()]
        return tuple(self._reduce_grids(items, video_input["video_grid_thw"], [s * per_second for s in seconds]))

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The prompt's positions with each item's reduced placeholders: text as unreduced (after an
        item, from its grid's extent); the item's slots provisional, set from the kept tokens by
        `recompute_mrope_positions` before the language model reads them."""
        if self.tome_plus is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        parts, start, position = [], 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            parts.append(torch.arange(offset - start).expand(3, -1) + position)
            base = position + offset - start
            grid = grid_positions(t, h, w, t_factor)
            parts.append(grid[:lengths[offset]].T + base)
            position = base + int(grid.max()) + 1
            start = offset + lengths[offset]
        parts.append(torch.arange(len(input_tokens) - start).expand(3, -1) + position)
        positions = torch.cat(parts, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """vLLM's pruning hook, per request and step: the kept tokens' positions (their extra
        channels, stripped) written into the prompt's slots this step computes. The embeddings
        are the items' parts this step covers, in order: the first may start inside its item (a
        chunked prefill), the others at their start. The text's positions need no change:
        `get_mrope_input_positions` numbered it from each item's extent, which does not depend on
        what is kept."""
        if self.tome_plus is None:  # Qwen2.5-VL's own video pruning
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        if not len(multimodal_embeddings):  # every step of every request calls this: nothing to place
            return [], mrope_positions, int(mrope_positions.max()) + 1 - mrope_positions.shape[1]
        positions = mrope_positions.clone()
        ids = torch.as_tensor(input_ids).cpu()
        media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        edges = torch.diff(media.long(), prepend=media.new_zeros(1).long(), append=media.new_zeros(1).long())
        starts, ends = (edges == 1).nonzero()[:, 0].tolist(), (edges == -1).nonzero()[:, 0].tolist()
        runs = [(a, b) for a, b in zip(starts, ends) if b > num_computed_tokens]  # an item's placeholders each
        for i, (embeds, (start, _)) in enumerate(zip(multimodal_embeddings, runs)):
            at = max(num_computed_tokens, start) if i == 0 else start
            base = positions[0, start - 1] + 1 if start > 0 else 0  # after the token before the item
            places = decode(embeds[:, -CHANNELS:]).to(positions.device)
            positions[:, at:at + places.shape[1]] = places + base
        delta = int(positions.max()) + 1 - positions.shape[1]
        return [m[:, :-CHANNELS] for m in multimodal_embeddings], positions, delta

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        # the encoder's graph path skips `_process_*_input`, where the features are reduced
        return config if self.tome_plus is None else dataclasses.replace(config, modalities=[])


class TomePlusQwen2VLProcessor(ReducedGridPlaceholders, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TomePlusQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TomePlusQwen2VL(ReducingMRopeModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL; with a `tome_plus` entry, each image's and video's features reduced."""
