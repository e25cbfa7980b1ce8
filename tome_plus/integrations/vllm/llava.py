"""LLaVA-1.5 (and its CLIP/SigLIP kin) in vLLM with its image features reduced: every image
gives the projector's `n` features (a fixed count), reduced to `settings.count(n)` after the
projector (site="features"), or fewer features leave its CLIP tower, which reduces inside its
layers (site="tower", `tower.py`)."""
from __future__ import annotations

from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import settings as S
from .reduce import ReducingModel, reduced_count
from .tower import reduced_features, removed


class TomePlusLlavaInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info; with a `tome_plus` entry, each image's placeholder count is
    the reduced one (what `embed_multimodal` returns)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = S.read(self.get_hf_config())
        if settings is None:
            return n
        if settings.site == "tower":
            return n - removed(settings.record, self.get_hf_config())
        return reduced_count(settings, n)


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=TomePlusLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TomePlusLlava(ReducingModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA; with a `tome_plus` entry, each image's projected features are reduced, or
    its CLIP tower reduces inside its layers."""

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        if self.tome_plus is None or self.tome_plus.site != "tower":
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        return reduced_features(vision_tower.vision_model, pixel_values, self.tome_plus.record,
                                self.config.vision_feature_select_strategy)
