"""LLaVA-1.5 (and its CLIP/SigLIP kin) in vLLM with its image features reduced: every image
gives the projector's `n` features (a fixed count), reduced to `settings.count(n)`."""
from __future__ import annotations

from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import settings as S
from .reduce import ReducingModel, reduced_count


class TomePlusLlavaInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info; with a `tome_plus` entry, each image's placeholder count is
    the reduced one (what `embed_multimodal` returns)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = S.read(self.get_hf_config())
        return n if settings is None else reduced_count(settings, n)


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=TomePlusLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TomePlusLlava(ReducingModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA; with a `tome_plus` entry, each image's projected features are reduced."""
