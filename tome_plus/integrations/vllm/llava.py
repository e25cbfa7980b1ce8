"""LLaVA-1.5 (and its CLIP/SigLIP kin) in vLLM with its image features reduced: every image
gives the projector's `n` features (a fixed count), reduced to `settings.count(n)`."""
from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...llm.features import reduce_sets
from . import settings as S


class TomePlusLlavaInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info; with a `tome_plus` entry, each image's placeholder count is
    the reduced one (what `embed_multimodal` returns)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = S.read(self.get_hf_config())
        return n if settings is None else S.check_count(settings, n)


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=TomePlusLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TomePlusLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with a `tome_plus` entry, each image's projected features are reduced."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tome_plus = S.read(vllm_config.model_config.hf_config)

    def _process_image_input(self, image_input):
        features = super()._process_image_input(image_input)
        if self.tome_plus is None:
            return features
        if isinstance(features, torch.Tensor):  # [images, n, D]: one count for every image
            return self._reduce(features)
        return tuple(self._reduce(f.unsqueeze(0))[0] for f in features)

    def _reduce(self, features: torch.Tensor) -> torch.Tensor:
        n_keep = S.check_count(self.tome_plus, features.shape[1])
        if n_keep >= features.shape[1]:
            return features
        kept, _ = reduce_sets(features, self.tome_plus.reducer, n_keep)
        return kept.to(features.dtype)
