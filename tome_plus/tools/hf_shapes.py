"""Random-weight HF LLaVA models of known shapes, and prompts for them, for `tome-plus bench --hf`.

No weights are downloaded: each shape is a config written out here, built with random init in the
dtype and on the device asked for. Importing this module does not import transformers (the timm
bench imports it for the shape names); building a model does.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Tuple

import torch

INSTALL_HINT = 'pip install -e ".[hf]"'

# Llama-2-7B / 13B as LLaVA-1.5 ships them (llava-hf): vocabulary grown by <image> and <pad>.
_LLAMA2 = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001,
               tie_word_embeddings=False)
_LLAVA15 = dict(image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                projector_hidden_act="gelu")
# OpenAI CLIP ViT-L/14 at 336 px, the LLaVA-1.5 tower.
_CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# Small enough for a handful of forwards on two CPU cores: a CLIP-B/16-224 tower, a 4-layer Llama.
_CLIP_B16_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_SMALL_LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=16, **_LLAMA2)


@dataclass(frozen=True)
class Shape:
    """A LLaVA config: `tower` "clip" or "siglip", the keyword arguments of its vision config, of
    the Llama text config and of `LlavaConfig` itself."""

    description: str
    tower: str
    vision: Dict[str, Any]
    text: Dict[str, Any]
    llava: Dict[str, Any] = field(default_factory=lambda: dict(_LLAVA15))
    gpu: bool = False  # too large to build on a CPU in reasonable time and memory


SHAPES: Dict[str, Shape] = {
    "llava-1.5-7b-shape": Shape(
        "LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 1024) + Llama-2-7B (32 layers, 4096)", "clip", _CLIP_L14_336,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, **_LLAMA2), gpu=True),
    "llava-1.5-13b-shape": Shape(
        "LLaVA-1.5-13B: CLIP ViT-L/14-336 (24 layers, 1024) + Llama-2-13B (40 layers, 5120)", "clip", _CLIP_L14_336,
        dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
             num_key_value_heads=40, **_LLAMA2), gpu=True),
    "llava-small-shape": Shape(
        "CPU-sized: CLIP ViT-B/16-224 (12 layers, 768) + Llama (4 layers, 1024)", "clip", _CLIP_B16_224,
        _SMALL_LLAMA),
    "llava-siglip-small-shape": Shape(
        "CPU-sized: SigLIP B/16-224 (12 layers, 768, no pooling head) + Llama (4 layers, 1024); "
        "every image token kept ('full'), last layer", "siglip",
        dict(_CLIP_B16_224, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
        _SMALL_LLAMA, dict(_LLAVA15, vision_feature_layer=-1, vision_feature_select_strategy="full")),
    "llava-tiny": Shape(
        "for tests: CLIP 64 px / 8 (4 layers, 64) + Llama (2 layers, 64)", "clip",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=64,
             patch_size=8),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=200, pad_token_id=0),
        dict(_LLAVA15, image_token_id=199)),
}


def check_shape(name: str) -> str:
    """An argparse `type`: a shape named in `SHAPES`."""
    if name not in SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return name


def shapes_help() -> str:
    """One line per shape, for `--help`."""
    return "; ".join(f"{name} ({shape.description})" for name, shape in SHAPES.items())


def require_transformers() -> None:
    """Raise a one-line ImportError naming the install command when transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--hf needs transformers ({e}); install it with {INSTALL_HINT}") from None


def llava_config(name: str):
    """The `LlavaConfig` of shape `name`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

    shape = SHAPES[name]
    vision = (CLIPVisionConfig if shape.tower == "clip" else SiglipVisionConfig)(**shape.vision)
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**shape.text), **shape.llava)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llava(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-init `LlavaForConditionalGeneration` of shape `name`, in eval mode.

    Built directly on `device` in `dtype`: a 7B model never passes through fp32 or the CPU, where
    its init alone would take minutes and 28 GB.
    """
    from transformers import LlavaForConditionalGeneration

    config = llava_config(name)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = LlavaForConditionalGeneration(config)
    return model.eval()


def image_placeholders(config) -> int:
    """Image tokens per image of the unpatched model, as the processor inserts them."""
    from ..backends.hf_llava import image_placeholders as count  # the backend's count (imports transformers)
    return count(config)


def make_inputs(config, batch: int, text_tokens: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask, pixel_values)`: per row BOS, a few text tokens, the image
    placeholders, the rest of the text (`text_tokens` non-image tokens in all, BOS included),
    one image each. Random text ids avoid the special ids, as a tokenizer's would."""
    generator = torch.Generator().manual_seed(seed)
    image_id, vocab = config.image_token_id, config.text_config.vocab_size
    text = torch.randint(3, min(image_id, vocab), (batch, text_tokens - 1), generator=generator)
    before = min(4, text_tokens - 1)  # "USER: " in front of the image, the question after it
    placeholders = torch.full((batch, image_placeholders(config)), image_id)
    bos = torch.ones(batch, 1, dtype=torch.long)
    ids = torch.cat([bos, text[:, :before], placeholders, text[:, before:]], dim=1).to(device)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)
    return ids, torch.ones_like(ids), pixels
