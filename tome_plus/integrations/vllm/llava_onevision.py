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
from .llava_next import newlines
from .reduce import reduce_item, reduced_count


class TomePlusLlavaOnevisionInfo(LlavaOnevisionProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = S.read(self.get_hf_config())
        if settings is None:
            return n
        return reduced_count(settings, n, newlines(self, image_width, image_height))

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
class TomePlusLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tome_plus = S.read(vllm_config.model_config.hf_config)

    def _process_image_input(self, image_input):
        features = super()._process_image_input(image_input)
        if self.tome_plus is None:
            return features
        return [reduce_item(f, self.tome_plus, self.image_newline) for f in features]

    def _process_video_pixels(self, inputs):
        features = super()._process_video_pixels(inputs)
        if self.tome_plus is None:
            return features
        return [reduce_item(f.reshape(-1, f.shape[-1]), self.tome_plus, self.image_newline) for f in features]
