"""Qwen2.5-VL in vLLM with each image's and each video's features reduced, as Qwen2-VL
(`qwen2_vl`): the kept tokens at their own M-RoPE positions, a video's temporal positions scaled
by its seconds per frame. Without a `tome_plus` entry, vLLM's own model (its EVS video pruning
included); with one, EVS is refused (both would reduce a video)."""
from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen2_vl import ReducedGridPlaceholders, ReducingMRopeModel


class TomePlusQwen2_5_VLProcessor(ReducedGridPlaceholders, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TomePlusQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TomePlusQwen2_5_VL(ReducingMRopeModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with a `tome_plus` entry, each image's and video's features reduced."""
