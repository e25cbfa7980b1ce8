"""LLaVA-OneVision in vLLM with each image's and each video's features reduced, newlines kept:
an image's count depends on its size (anyres, down-scaled past 9 tiles), a video's on its
frames (pooled 2 x 2, one newline after the clip); both decided before scheduling."""
from __future__ import annotations

from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import settings as S
from .llava_next import ReducedAnyresCounts
from .reduce import ReducingModel, reduced_count


class TomePlusLlavaOnevisionInfo(ReducedAnyresCounts, LlavaOnevisionProcessingInfo):
    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        n = super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
        settings = S.read(self.get_hf_config())
        if settings is None or self.__dict__.get("_unreduced"):
            return n
        return reduced_count(settings, n, newlines=1)

    def _get_max_video_frames(self, max_tokens: int) -> int:
        # the frames a profiling clip may have, counted unreduced: the encoder sees every frame,
        # and under tokens=N a clip's reduced count does not grow with its frames (no bound)
        self.__dict__["_unreduced"] = True
        try:
            return super()._get_max_video_frames(max_tokens)
        finally:
            del self.__dict__["_unreduced"]


@MULTIMODAL_REGISTRY.register_processor(LlavaOnevisionMultiModalProcessor, info=TomePlusLlavaOnevisionInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class TomePlusLlavaOnevision(ReducingModel, LlavaOnevisionForConditionalGeneration):
    NEWLINES = True

    def _process_video_pixels(self, inputs):
        return self.reduce_items(super()._process_video_pixels(inputs))
