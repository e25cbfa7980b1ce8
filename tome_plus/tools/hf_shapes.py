"""Random-weight HF vision-language models of known shapes (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL,
Qwen3-VL, Qwen3.5, Gemma 3, InternVL), and prompts for them, for `tome-plus bench --hf`.

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

from .hf_prompts import gemma3_batch, internvl_batch

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
    """A VLM config: `tower` "clip" or "siglip" (Qwen: "qwen", InternVL: "internvit"), the keyword
    arguments of its vision config, of the text config and of the model's config itself; `family`
    the HF class family ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "internvl"), `media` what
    each prompt carries: an image `(H, W)` or a video `(frames, H, W)` (InternVL: images only)."""

    description: str
    tower: str
    vision: Dict[str, Any]
    text: Dict[str, Any]
    llava: Dict[str, Any] = field(default_factory=lambda: dict(_LLAVA15))
    gpu: bool = False  # too large to build on a CPU in reasonable time and memory
    family: str = "llava"
    media: Tuple[int, ...] = ()  # () for LLaVA-1.5: one image of the tower's size


# LLaVA-NeXT (llava-v1.6-vicuna-7b-hf): the LLaVA-1.5 tower and LLM, anyres over five grids
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_LLAVA_NEXT = dict(_LLAVA15, image_grid_pinpoints=_NEXT_PINPOINTS)
_SMALL_NEXT = dict(_LLAVA15, image_grid_pinpoints=[[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]])
# Qwen2.5-VL-7B-Instruct: a 32-block window-attention tower (patch 14, 2 x 2 merger) + Qwen2-7B
_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
_QWEN25_TOWER = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                     fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
_QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                 tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
# CPU-sized: 4 tower blocks of 640, a 4-layer text model of 1024 (head dim 128 as in the 7B)
_SMALL_QWEN_TOWER = dict(_QWEN25_TOWER, depth=4, hidden_size=640, intermediate_size=1712, num_heads=8,
                         out_hidden_size=1024, fullatt_block_indexes=[1, 3])
_SMALL_QWEN2 = dict(_QWEN2_7B, vocab_size=152064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2)
# Qwen3-VL-8B-Instruct: a 27-block tower (1152, patch 16, a learned 48 x 48 position grid interpolated to the
# image's, 2 x 2 merger, DeepStack features from blocks 8, 16 and 24) + a Qwen3-8B text model (36 layers, 4096,
# q/k-norm, interleaved M-RoPE); the same special ids as Qwen2.5-VL
_QWEN3_VL_TOWER = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
_QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                 max_position_embeddings=262144, bos_token_id=151643, eos_token_id=151645,
                 rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True})
# CPU-sized: 4 tower blocks of 640 (head dim 80: the tower's 2-D rotary wants a multiple of 4; DeepStack from the
# first 3, as the 8B's come from below its last block), a 4-layer text model of 1024 (head dim 128 as in the 8B,
# so the M-RoPE sections stay [24, 20, 20]); out_hidden_size is the text width
_SMALL_QWEN3_TOWER = dict(_QWEN3_VL_TOWER, depth=4, hidden_size=640, intermediate_size=2560, num_heads=8,
                          out_hidden_size=1024, deepstack_visual_indexes=[0, 1, 2])
_SMALL_QWEN3 = dict(_QWEN3_8B, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2)
# InternVL3-8B-hf: InternViT-300M (24 layers, 1024, 448 px / patch 14: 32 x 32 patches + CLS) + a 2 x 2 pixel
# shuffle (256 tokens per 448 px tile) + Qwen2.5-7B (vocabulary grown to 151674 by InternVL's tokens)
_INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=448, patch_size=14, hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6,
                       layer_scale_init_value=0.1, attention_bias=True, use_qk_norm=False)
_QWEN25_7B_INTERNVL = dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                           num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                           max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
_INTERNVL = dict(image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                 vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
# CPU-sized: a 12-layer InternViT of 768 at 224 px / patch 14 (16 x 16 patches: 64 tokens per tile after the
# shuffle) + a 4-layer Qwen2 of 1024
_SMALL_INTERNVIT = dict(_INTERNVIT_300M, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=224)
# Qwen3.5: transformers' `Qwen3_5Config` defaults (a 9B-class hybrid: 32 layers of 4096, three Gated DeltaNet
# layers to one full-attention layer with a gated q, q/k-norm and M-RoPE on a quarter of head_dim 256) with
# Qwen3-VL's tower (no DeepStack) projecting to the text width
_QWEN35_IDS = dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                   vision_end_token_id=248054)
_QWEN35_TOWER = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                     patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                     hidden_act="gelu_pytorch_tanh")
_QWEN35_9B = dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
                  linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                  max_position_embeddings=32768, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                   "mrope_section": [11, 11, 10], "mrope_interleaved": True})
# CPU-sized: Qwen3-VL's small tower, 4 text layers of 1024 (three linear, one full; head_dim 256 as above)
_SMALL_QWEN35_TOWER = dict(_QWEN35_TOWER, depth=4, hidden_size=640, intermediate_size=2560, num_heads=8,
                           out_hidden_size=1024)
_SMALL_QWEN35 = dict(_QWEN35_9B, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, linear_num_key_heads=4, linear_num_value_heads=8)
# Gemma 3 12B (gemma-3-12b-it): SigLIP-So400m at 896 px / patch 14 (64 x 64 patches, pooled 4 x 4 to 256 tokens)
# + Gemma 3 (48 layers of 3840; five sliding-window layers (1024, rotary base 1e4) to one global (1e6, linear
# scaling 8); q/k-norm)
_GEMMA3_IDS = dict(image_token_index=262144, boi_token_index=255999, eoi_token_index=256000, mm_tokens_per_image=256)
_SIGLIP_SO400M_896 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          image_size=896, patch_size=14, vision_use_head=False, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6)
_GEMMA3_12B = dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6, pad_token_id=0,
                   bos_token_id=2, eos_token_id=1,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}})
# CPU-sized: SigLIP B/16-sized at 224 px / patch 14 (16 x 16 patches pooled 2 x 2 to 64 tokens), 6 text layers of
# 1024 (five sliding, one global: the 12B's pattern; a window of 64, shorter than the prompt)
_SMALL_SIGLIP_GEMMA = dict(_SIGLIP_SO400M_896, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224)
_SMALL_GEMMA3 = dict(_GEMMA3_12B, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128, sliding_window=64)
_SMALL_QWEN2_INTERNVL = dict(_QWEN25_7B_INTERNVL, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2)

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
    "llava-next-7b-shape": Shape(
        "LLaVA-NeXT-7B (v1.6 Vicuna): CLIP ViT-L/14-336 + Llama-2-7B, anyres; one 1344x1344 image (2 x 2 crops "
        "and the base: 2928 image tokens)", "clip", _CLIP_L14_336,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, **_LLAMA2), _LLAVA_NEXT, gpu=True, family="llava_next", media=(1344, 1344)),
    "qwen2.5-vl-7b-shape": Shape(
        "Qwen2.5-VL-7B: 32-block window-attention tower (1280, patch 14, 2 x 2 merger) + Qwen2-7B (28 layers, 3584); "
        "one 1344x1344 image (2304 image tokens)", "qwen", _QWEN25_TOWER, _QWEN2_7B, dict(_QWEN_IDS), gpu=True,
        family="qwen2_5_vl", media=(1344, 1344)),
    "qwen2.5-vl-7b-video-shape": Shape(
        "Qwen2.5-VL-7B as above; one 16-frame 448x448 video (8 x 16 x 16 = 2048 video tokens)", "qwen",
        _QWEN25_TOWER, _QWEN2_7B, dict(_QWEN_IDS), gpu=True, family="qwen2_5_vl", media=(16, 448, 448)),
    "llava-next-small-shape": Shape(
        "CPU-sized LLaVA-NeXT: CLIP ViT-B/16-224 (12 layers) + Llama (4 layers, 1024), anyres; one 448x448 image "
        "(2 x 2 crops and the base: 1008 image tokens)", "clip", _CLIP_B16_224, _SMALL_LLAMA, _SMALL_NEXT,
        family="llava_next", media=(448, 448)),
    "qwen2.5-vl-small-shape": Shape(
        "CPU-sized Qwen2.5-VL: 4 tower blocks (640) + a Qwen2 text model (4 layers, 1024); one 448x448 image "
        "(256 image tokens)", "qwen", _SMALL_QWEN_TOWER, _SMALL_QWEN2, dict(_QWEN_IDS), family="qwen2_5_vl",
        media=(448, 448)),
    "qwen2.5-vl-small-video-shape": Shape(
        "CPU-sized Qwen2.5-VL as above; one 8-frame 224x224 video (4 x 8 x 8 = 256 video tokens)", "qwen",
        _SMALL_QWEN_TOWER, _SMALL_QWEN2, dict(_QWEN_IDS), family="qwen2_5_vl", media=(8, 224, 224)),
    "qwen3-vl-8b-shape": Shape(
        "Qwen3-VL-8B: 27-block tower (1152, patch 16, 2 x 2 merger, DeepStack from 3 blocks) + Qwen3-8B (36 layers, "
        "4096); one 1344x1344 image (1764 image tokens)", "qwen", _QWEN3_VL_TOWER, _QWEN3_8B, dict(_QWEN_IDS),
        gpu=True, family="qwen3_vl", media=(1344, 1344)),
    "qwen3.5-9b-shape": Shape(
        "Qwen3.5 9B-class (transformers' defaults): 27-block tower (1152, patch 16, 2 x 2 merger) + a hybrid text "
        "model (32 layers of 4096: 24 Gated DeltaNet, 8 full attention); one 1344x1344 image (1764 image tokens)",
        "qwen", _QWEN35_TOWER, _QWEN35_9B, dict(_QWEN35_IDS), gpu=True, family="qwen3_5", media=(1344, 1344)),
    "gemma3-12b-shape": Shape(
        "Gemma 3 12B: SigLIP-So400m (27 layers, 1152, 896 px) pooled to 256 tokens + Gemma 3 (48 layers of 3840, "
        "sliding-window and global layers 5:1); one image (256 image tokens)", "siglip", _SIGLIP_SO400M_896,
        _GEMMA3_12B, dict(_GEMMA3_IDS), gpu=True, family="gemma3"),
    "internvl3-8b-shape": Shape(
        "InternVL3-8B: InternViT-300M (24 layers, 1024, 448 px tiles, 2 x 2 pixel shuffle) + Qwen2.5-7B (28 layers, "
        "3584); one 896x896 image (2 x 2 tiles and a thumbnail: 1280 image tokens)", "internvit", _INTERNVIT_300M,
        _QWEN25_7B_INTERNVL, dict(_INTERNVL), gpu=True, family="internvl", media=(896, 896)),
    "qwen3-vl-small-shape": Shape(
        "CPU-sized Qwen3-VL: 4 tower blocks (640, DeepStack from 3) + a Qwen3 text model (4 layers, 1024); one "
        "448x448 image (196 image tokens)", "qwen", _SMALL_QWEN3_TOWER, _SMALL_QWEN3, dict(_QWEN_IDS),
        family="qwen3_vl", media=(448, 448)),
    "qwen3.5-small-shape": Shape(
        "CPU-sized Qwen3.5: 4 tower blocks (640) + a hybrid text model (4 layers of 1024: 3 Gated DeltaNet, 1 full); "
        "one 448x448 image (196 image tokens)", "qwen", _SMALL_QWEN35_TOWER, _SMALL_QWEN35, dict(_QWEN35_IDS),
        family="qwen3_5", media=(448, 448)),
    "gemma3-small-shape": Shape(
        "CPU-sized Gemma 3: SigLIP (12 layers, 768, 224 px) pooled to 64 tokens + Gemma 3 (6 layers of 1024, five "
        "sliding-window (64) to one global); one image (64 image tokens)", "siglip", _SMALL_SIGLIP_GEMMA,
        _SMALL_GEMMA3, dict(_GEMMA3_IDS, mm_tokens_per_image=64), family="gemma3"),
    "internvl-small-shape": Shape(
        "CPU-sized InternVL: InternViT (12 layers, 768, 224 px tiles) + a Qwen2 text model (4 layers, 1024); one "
        "448x448 image (2 x 2 tiles and a thumbnail: 320 image tokens)", "internvit", _SMALL_INTERNVIT,
        _SMALL_QWEN2_INTERNVL, dict(_INTERNVL, image_seq_length=64), family="internvl", media=(448, 448)),
    "llava-tiny": Shape(
        "for tests: CLIP 64 px / 8 (4 layers, 64) + Llama (2 layers, 64)", "clip",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=64,
             patch_size=8),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=200, pad_token_id=0),
        dict(_LLAVA15, image_token_id=199)),
    "llava-next-tiny": Shape(
        "for tests: LLaVA-NeXT, CLIP 32 px / 8 (2 layers, 32) + Llama (2 layers, 64); one 64x64 image (2 x 2 crops "
        "and the base)", "clip",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=200, pad_token_id=0),
        dict(_LLAVA15, image_token_id=199, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]]),
        family="llava_next", media=(64, 64)),
    "qwen2.5-vl-tiny": Shape(
        "for tests: Qwen2.5-VL, 2 tower blocks (32, patch 8) + a Qwen2 text model (2 layers, 64); one 8-frame 64x64 "
        "video", "qwen",
        dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=8,
             spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1]),
        dict(vocab_size=151700, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        dict(_QWEN_IDS), family="qwen2_5_vl", media=(8, 64, 64)),
    "qwen3-vl-tiny": Shape(
        "for tests: Qwen3-VL, 2 tower blocks (32, patch 8, DeepStack from both) + a Qwen3-VL text model (2 layers, "
        "64); one 8-frame 64x64 video (a run per temporal patch)", "qwen",
        dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=8,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        dict(vocab_size=151700, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                              "mrope_interleaved": True}),
        dict(_QWEN_IDS), family="qwen3_vl", media=(8, 64, 64)),
    "qwen3.5-tiny": Shape(
        "for tests: Qwen3.5, 2 tower blocks (32, patch 8) + a hybrid text model (4 layers of 64: 3 Gated DeltaNet, "
        "1 full); one 64x64 image (16 image tokens)", "qwen",
        dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=8,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16),
        dict(vocab_size=151700, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=16,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                              "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        dict(_QWEN_IDS), family="qwen3_5", media=(64, 64)),
    "gemma3-tiny": Shape(
        "for tests: Gemma 3, SigLIP 32 px / 4 (2 layers, 32) pooled to 16 tokens + Gemma 3 (4 layers of 64, sliding "
        "window 8 and global layers alternating)", "siglip",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=4, vision_use_head=False),
        dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, pad_token_id=0,
             bos_token_id=2, eos_token_id=1, layer_types=["sliding_attention", "full_attention"] * 2),
        dict(image_token_index=299, boi_token_index=297, eoi_token_index=298, mm_tokens_per_image=16),
        family="gemma3"),
    "internvl-tiny": Shape(
        "for tests: InternVL, InternViT 48 px / 8 (2 layers, 32; 9 tokens per tile) + Qwen2 (2 layers, 64); one "
        "96x96 image (2 x 2 tiles and a thumbnail)", "internvit",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=48,
             patch_size=8),
        dict(model_type="qwen2", vocab_size=151700, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2),
        dict(_INTERNVL, image_seq_length=9), family="internvl", media=(96, 96)),
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
    """The model config of shape `name` (`LlavaConfig`, `LlavaNextConfig`, `Qwen2_5_VLConfig`,
    `Qwen3VLConfig` or `InternVLConfig`)."""
    from transformers import (CLIPVisionConfig, Gemma3Config, InternVLConfig, LlamaConfig, LlavaConfig,
                              LlavaNextConfig, Qwen2_5_VLConfig, Qwen3_5Config, Qwen3VLConfig, SiglipVisionConfig)

    shape = SHAPES[name]
    own = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig, "internvl": InternVLConfig,
           "qwen3_5": Qwen3_5Config}
    if shape.family == "gemma3":  # its vision config is SigLIP's; the text config its own
        return Gemma3Config(vision_config=SiglipVisionConfig(**shape.vision), text_config=shape.text, **shape.llava)
    if shape.family in own:  # vision and text configs of the family's own classes, from dicts
        return own[shape.family](vision_config=shape.vision, text_config=shape.text, **shape.llava)
    vision = (CLIPVisionConfig if shape.tower == "clip" else SiglipVisionConfig)(**shape.vision)
    config_cls = LlavaNextConfig if shape.family == "llava_next" else LlavaConfig
    return config_cls(vision_config=vision, text_config=LlamaConfig(**shape.text), **shape.llava)


def model_class(name: str):
    """The HF class a shape builds."""
    import transformers
    return getattr(transformers, {"llava": "LlavaForConditionalGeneration",
                                  "llava_next": "LlavaNextForConditionalGeneration",
                                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                  "qwen3_vl": "Qwen3VLForConditionalGeneration",
                                  "internvl": "InternVLForConditionalGeneration",
                                  "qwen3_5": "Qwen3_5ForConditionalGeneration",
                                  "gemma3": "Gemma3ForConditionalGeneration"}[SHAPES[name].family])


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-init model of shape `name` (`model_class`), in eval mode.

    Built directly on `device` in `dtype`: a 7B model never passes through fp32 or the CPU, where
    its init alone would take minutes and 28 GB.
    """
    config = llava_config(name)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(name)(config)
    return model.eval()


def build_llava(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """`build_model` for a LLaVA-1.5 shape (what ATP training's data, `make_inputs`, feeds)."""
    if SHAPES[name].family != "llava":
        raise ValueError(f"{name} is a {SHAPES[name].family} shape; this needs a LLaVA-1.5 one "
                         f"({', '.join(n for n, s in SHAPES.items() if s.family == 'llava')})")
    return build_model(name, device, dtype, seed)


def image_placeholders(config) -> int:
    """Image tokens per image of the unpatched model, as the processor inserts them."""
    from ..vlm.images import image_placeholders as count  # the backend's count (imports transformers)
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


def make_batch(model, shape: str, batch: int, text_tokens: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 1) -> Dict[str, torch.Tensor]:
    """The forward keyword arguments for `batch` prompts of shape `shape`'s family, each with
    `text_tokens` text tokens around one image or video (`Shape.media`) as its processor lays them
    out: LLaVA-1.5 `make_inputs`; LLaVA-NeXT its crops (`pixel_values [B, tiles, 3, S, S]`,
    `image_sizes`) and as many placeholders as the unpatched model makes features; Qwen2.5-VL and
    Qwen3-VL the flattened patches with their `image_grid_thw` (or `video_grid_thw`), vision
    start/end tokens and `mm_token_type_ids` (Qwen3-VL: a video's run per temporal patch, after its
    timestamp); InternVL its tiles and thumbnail (`pixel_values [B * tiles, 3, S, S]`) and
    `image_seq_length` placeholders per tile between `<img>` and `</img>`."""
    spec = SHAPES[shape]
    config = model.config
    if spec.family == "llava":
        ids, mask, pixels = make_inputs(config, batch, text_tokens, device, dtype, seed)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    qwen_vocab = spec.family in ("qwen2_5_vl", "qwen3_vl", "internvl", "qwen3_5")  # a Qwen tokenizer: no BOS
    low = 0 if qwen_vocab else 3
    high = 151643 if qwen_vocab else min(vocab, config.image_token_id, 255999)  # below the special ids
    text = torch.randint(low, high, (batch, text_tokens), generator=generator)
    before = min(4, text_tokens)
    if spec.family == "internvl":
        return internvl_batch(config, spec.media, text, before, generator, device, dtype)
    if spec.family == "gemma3":
        return gemma3_batch(config, text, before, generator, device, dtype)
    if spec.family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        side = config.vision_config.image_size
        tiles = image_size_to_num_patches(spec.media, config.image_grid_pinpoints, side)
        data = dict(pixel_values=torch.randn(batch, tiles, 3, side, side, generator=generator).to(device, dtype),
                    image_sizes=torch.tensor([list(spec.media)] * batch, device=device))
        with torch.no_grad():  # the model's own count, which the processor's matches
            features = model.model.get_image_features(pixel_values=data["pixel_values"][:1],
                                                      image_sizes=data["image_sizes"][:1], return_dict=True)
        run = torch.full((batch, features.pooler_output[0].shape[0]), config.image_token_id)
        ids = torch.cat([text[:, :before], run, text[:, before:]], dim=1)
        ids[:, 0] = 1  # BOS
        data.update(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device))
        return data
    vision = config.vision_config
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    video = len(spec.media) == 3
    frames, height, width = spec.media if video else (tp,) + tuple(spec.media)
    if height % (p * m) or width % (p * m):
        raise ValueError(f"{shape}: the media size must be a multiple of {p * m} (Qwen's processor resizes to it)")
    grid = [frames // tp if video else 1, height // p, width // p]
    n_patches = grid[0] * grid[1] * grid[2]
    patches = torch.randn(batch * n_patches, 3 * tp * p * p, generator=generator).to(device, dtype)
    token = config.video_token_id if video else config.image_token_id

    def wrapped(n: int) -> torch.Tensor:  # vision start, n placeholders, vision end
        return torch.cat([torch.full((batch, 1), config.vision_start_token_id), torch.full((batch, n), token),
                          torch.full((batch, 1), config.vision_end_token_id)], dim=1)
    if video and spec.family in ("qwen3_vl", "qwen3_5"):
        # Qwen3VLProcessor: each temporal patch its own run after its "<t seconds>" text (two tokens here)
        stamps = torch.randint(low, high, (batch, grid[0], 2), generator=generator)
        run = torch.cat([torch.cat([stamps[:, t], wrapped(grid[1] * grid[2] // (m * m))], dim=1)
                         for t in range(grid[0])], dim=1)
    else:
        run = wrapped(n_patches // (m * m))
    ids = torch.cat([text[:, :before], run, text[:, before:]], dim=1)
    kind = torch.zeros_like(ids)
    kind[ids == token] = 2 if video else 1
    grids = torch.tensor([grid] * batch, device=device)
    data = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                mm_token_type_ids=kind.to(device))
    if video:
        data.update(pixel_values_videos=patches, video_grid_thw=grids)
        if spec.family == "qwen2_5_vl":  # Qwen3-VL reads time from the timestamps in the text instead
            data["second_per_grid_ts"] = torch.full((batch,), tp / 2.0, device=device)  # sampled at 2 fps
    else:
        data.update(pixel_values=patches, image_grid_thw=grids)
    return data


def media_size(shape: str, config) -> Tuple[int, ...]:
    """What each prompt of the shape carries, for the report: (H, W) of its image, or (frames, H, W)."""
    media = SHAPES[shape].media
    return tuple(media) if media else (config.vision_config.image_size,) * 2
