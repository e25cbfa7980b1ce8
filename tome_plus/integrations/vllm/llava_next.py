"""LLaVA-NeXT in vLLM with each image's features reduced (the base tile's and the anyres grid's
together, as one image), its newline tokens kept: the count depends on the image size
(`get_num_image_tokens`), decided before scheduling."""
from __future__ import annotations

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import settings as S
from .reduce import ReducingModel, reduced_count


def newlines(info, image_width: int, image_height: int) -> int:
    """The newline tokens among an image's placeholders (one per row of its unpadded grid)."""
    from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape
    encoder = info.get_vision_encoder_info()
    rows, columns = get_anyres_image_grid_shape(image_size=(image_height, image_width),
                                                grid_pinpoints=info.get_hf_config().image_grid_pinpoints,
                                                patch_size=encoder.get_image_size())
    return info._get_num_unpadded_features(original_height=image_height, original_width=image_width,
                                           npatches=encoder.get_patch_grid_length(), num_patch_height=rows,
                                           num_patch_width=columns)[1]


class ReducedAnyresCounts:
    """Mixin for an anyres family's processing info (NeXT, OneVision): with a `tome_plus` entry,
    an image's placeholders are its reduced tokens plus its newlines."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        settings = S.read(self.get_hf_config())
        if settings is None:
            return n
        return reduced_count(settings, n, newlines(self, image_width, image_height))


class TomePlusLlavaNextInfo(ReducedAnyresCounts, LlavaNextProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(LlavaNextMultiModalProcessor, info=TomePlusLlavaNextInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TomePlusLlavaNext(ReducingModel, LlavaNextForConditionalGeneration):
    NEWLINES = True
