"""The vision-language families `hf_llava` patches, one row each (`Family`), keyed by the VLM's
`config.model_type`: its classes, its vision tower and whether a method may reduce in it, how its
image features reach the language model (one fixed-size run per image, or packed runs of their
own length, with newline tokens), and its decoder's row (`llm.decoders.DECODERS`).

Everything that differs between the families is read from here (`family(model)`): the backend's
`MODELS` and `FAMILY` (`hf_llava`), the tower site's refusal (`hf_llava.check_site`), the tower
(`vlm.images.tower`), the prompt cut (`vlm.calls`), the runs and newlines the language model is
told of (`vlm.prompt.llm_inputs`). Adding a family whose parts are all described here is one row
(`docs/adding-a-family.md`); `tests/test_families.py` checks every row against the installed
transformers and the tiny models of `tests/vlm_models.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type

import torch.nn as nn

# why the tower site is refused where each image's run has a length of their own (site="features"
# or "llm" instead): anyres (crops' grids packed, unpadded, with newline tokens; OneVision's videos
# pooled per frame), Qwen2-VL and Qwen2.5-VL (native resolution, a 2 x 2 patch merger, M-RoPE)
_ANYRES = "packs each image's tower grids (anyres crops, unpadded, with newline tokens)"
_QWEN = "merges 2 x 2 patches after its tower, whose windows and rotary positions need the full grid"
_GEMMA3 = "pools each image's tower patches to a fixed grid of tokens in its projector, which needs the full grid"
_INTERNVL = ("tiles each image into its own number of crops plus a thumbnail and pixel-shuffles 2 x 2 after its "
             "InternViT tower (no tower adapter yet)")


@dataclass(frozen=True)
class Family:
    """One vision-language family: what tome_plus needs to know of it, by name (nothing here imports
    transformers; `classes` resolves the names)."""

    model_type: str  # the VLM's `config.model_type`
    model: str  # its generation class in transformers (`LlavaForConditionalGeneration`); subclasses match
    inner: str  # its inner model class (`LlavaModel`: `model.model`)
    # the tower adapter: "clip" (a CLIP or SigLIP tower that `hf_clip` reduces in, site="tower"), or
    # None where the tower site is refused (`packed` says why)
    tower: Optional[str]
    tower_attr: str = "vision_tower"  # the inner model's attribute holding the tower
    # None: one fixed-size run of placeholders per image (a projector that takes any count); else
    # why each image's run has a length of its own (the refusal of site="tower" quotes it)
    packed: Optional[str] = None
    newline: Optional[str] = None  # the inner model's parameter of the never-reduced newline token, if any
    # the decoder row (`llm.decoders.DECODERS` key) the family's own text model always has; None
    # where `text_config` chooses it (LLaVA's: any row, Llama, Mistral, Qwen2, ...)
    decoder: Optional[str] = None

    def classes(self) -> Tuple[Type[nn.Module], Type[nn.Module]]:
        """(generation class, inner model class) from the installed transformers."""
        import transformers

        return getattr(transformers, self.model), getattr(transformers, self.inner)


FAMILIES: Dict[str, Family] = {row.model_type: row for row in (
    Family("llava", "LlavaForConditionalGeneration", "LlavaModel", tower="clip"),
    Family("vipllava", "VipLlavaForConditionalGeneration", "VipLlavaModel", tower="clip"),
    Family("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextModel", tower=None, packed=_ANYRES,
           newline="image_newline"),
    Family("llava_next_video", "LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel", tower=None,
           packed=_ANYRES + " and pools each video frame", newline="image_newline"),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel", tower=None,
           packed=_ANYRES + " and pools each video frame", newline="image_newline"),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLModel", tower=None, tower_attr="visual",
           packed=_QWEN, decoder="qwen2_vl_text"),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel", tower=None, tower_attr="visual",
           packed=_QWEN, decoder="qwen2_5_vl_text"),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLModel", tower=None, tower_attr="visual",
           packed=_QWEN, decoder="qwen3_vl_text"),
    Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel", tower=None, tower_attr="visual",
           packed=_QWEN, decoder="qwen3_vl_moe_text"),
    Family("qwen3_5", "Qwen3_5ForConditionalGeneration", "Qwen3_5Model", tower=None, tower_attr="visual",
           packed=_QWEN, decoder="qwen3_5_text"),
    Family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel", tower=None, tower_attr="visual",
           packed=_QWEN, decoder="qwen3_5_moe_text"),
    Family("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Model", tower=None, packed=_GEMMA3,
           decoder="gemma3_text"),
    Family("internvl", "InternVLForConditionalGeneration", "InternVLModel", tower=None, packed=_INTERNVL),
)}
# what each tower adapter is, for messages
TOWERS = {"clip": "CLIP and SigLIP towers (`hf_clip`)"}


def family(model: nn.Module) -> Family:
    """The row of a VLM or of its inner model: its `config.model_type`'s where the model is of that
    row's class, else the row of a class in its MRO (a subclass with a config of its own)."""
    names = {c.__name__ for c in type(model).__mro__}
    row = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    if row is not None and (row.model in names or row.inner in names):
        return row
    row = next((row for row in FAMILIES.values() if row.model in names or row.inner in names), None)
    if row is None:
        raise TypeError(f"{type(model).__name__} is no vision-language family tome_plus knows "
                        f"({', '.join(r.model for r in FAMILIES.values())})")
    return row


def packed(model: nn.Module) -> bool:
    """A model whose image runs each have a length of their own (`model` or its inner model):
    nothing reduces in its tower."""
    return family(model).packed is not None


def tower_module(model: nn.Module) -> nn.Module:
    """The vision tower of the VLM (or of its inner model), whatever its kind."""
    inner = model.model if hasattr(model, "model") else model
    return getattr(inner, family(model).tower_attr)
