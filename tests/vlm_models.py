"""Tiny random-weight HF vision-language models and processor-free inputs for them (test helpers, no tests).

Factories (seeded with ``torch.manual_seed(0)``: two calls give identical weights; eval mode; sdpa attention):

    llava_next(**overrides)        LlavaNextForConditionalGeneration       CLIP tower + Llama
    llava_onevision(**overrides)   LlavaOnevisionForConditionalGeneration  SigLIP tower + Qwen2
    llava_next_video(**overrides)  LlavaNextVideoForConditionalGeneration  CLIP tower + Llama
    qwen2_vl(**overrides)          Qwen2VLForConditionalGeneration
    qwen2_5_vl(**overrides)        Qwen2_5_VLForConditionalGeneration
    qwen3_vl(**overrides)          Qwen3VLForConditionalGeneration         DeepStack, q/k-norm, interleaved M-RoPE
    qwen3_vl_moe(**overrides)      Qwen3VLMoeForConditionalGeneration      as qwen3_vl, MoE MLPs
    qwen3_5(**overrides)           Qwen3_5ForConditionalGeneration         linear-attention + full layers
    qwen3_5_moe(**overrides)       Qwen3_5MoeForConditionalGeneration      as qwen3_5, MoE MLPs
    gemma3(**overrides)            Gemma3ForConditionalGeneration          SigLIP + Gemma 3 (windows, both-ways images)
    internvl(**overrides)          InternVLForConditionalGeneration        InternViT + pixel shuffle + Qwen2

``model.generation_config.suppress_tokens`` holds the image / video / vision-start / vision-end ids (see `_build`).
``overrides`` are keyword arguments of the top-level config; ``vision_config`` / ``text_config`` given as dicts
are merged into the tiny defaults (``llava_next(text_config={"num_hidden_layers": 4})``); ``attn_implementation``
is passed to ``_from_config``.

Input builders produce, without a processor (there are no tokenizer files), what the HF processor would produce
for a batch of prompts: ``<family>_inputs(model, rows=..., image_sizes=..., videos=...)``. A prompt row is a list
of items: an ``int`` n is n text tokens, ``"image"`` the placeholders of the next image of ``image_sizes``,
``"video"`` those of the next video of ``videos``. Rows are left-padded with id 0 (attention_mask 0 there).
The placeholder counts come from the HF processors' own code, run on a bare processor object that holds only the
attributes that code reads (no tokenizer, no image processor):

* LLaVA-NeXT: ``LlavaNextProcessor.replace_image_token`` -> ``_get_number_of_features`` ->
  ``_get_unpadded_features`` (transformers/models/llava_next/processing_llava_next.py; anyres grid from
  ``image_processing_utils.select_best_resolution``; includes the image_newline tokens and, for the ``default``
  strategy, the CLS subtraction), tiles per image from ``modeling_llava_next.image_size_to_num_patches``.
* LLaVA-OneVision: ``LlavaOnevisionProcessor.replace_image_token`` / ``replace_video_token``
  (processing_llava_onevision.py; anyres_max_N down-scaling, multi-image rows = base tile + 1 newline, video =
  frames * ceil(n/2)^2 + 1 newline), tiles from ``modeling_llava_onevision.image_size_to_num_patches``.
* LLaVA-NeXT-Video: ``LlavaNextVideoProcessor.replace_image_token`` / ``replace_video_token``
  (processing_llava_next_video.py; video = (S/p)^2 // 4 per frame).
* Qwen2-VL / Qwen2.5-VL: ``image_processing_qwen2_vl.smart_resize`` / ``video_processing_qwen2_vl.smart_resize``
  for the resized size, grid ``(ceil(frames / temporal_patch), H/patch, W/patch)`` as in ``patchify``, and
  ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor.replace_image_token`` / ``replace_video_token`` (grid.prod() //
  merge^2). ``mm_token_type_ids`` (0 text, 1 image, 2 video) as ``ProcessorMixin.create_mm_token_type_ids``;
  Qwen2.5 adds ``second_per_grid_ts = temporal_patch_size / fps`` per video.
* Qwen3-VL / Qwen3.5: as Qwen2-VL for images; ``Qwen3VLProcessor.replace_video_token`` for videos (a run per
  temporal patch after its ``<t seconds>`` text, from the video's metadata), Qwen3-VL's video ``smart_resize``.
* Gemma 3: ``Gemma3Processor``'s image block and ``replace_image_token`` (pan-and-scan crops), ``token_type_ids``
  1 on the soft tokens.
* InternVL: ``get_optimal_tiled_canvas`` (the GotOcr2 image processor's tiles, plus a thumbnail) and
  ``InternVLProcessor.replace_image_token`` / ``replace_video_token`` (a video's frames are image runs).

Pixel values are seeded noise in exactly the processor's shapes (LLaVA: ``[n_images, max_tiles, 3, S, S]``
zero-padded on the tile axis as ``_pad_for_batching`` does, plus ``image_sizes`` (H, W); videos
``[n_videos, frames, 3, S, S]``; Qwen: ``[sum(t*h*w), 3 * temporal_patch * patch * patch]`` plus ``*_grid_thw``).

The returned ``VLMInputs`` is a plain dict of model kwargs (``model(**inputs)``, ``model.generate(**inputs)``)
with a ``.meta`` attribute; ``take_row(inputs, i)`` returns row i alone, unpadded, with its own images and videos,
exactly as the processor would build a batch of that one prompt.
"""
from itertools import accumulate
from types import SimpleNamespace

import torch
from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                          Qwen3_5MoeForConditionalGeneration, Gemma3Config, Gemma3ForConditionalGeneration, InternVLConfig, InternVLForConditionalGeneration, LlavaNextConfig, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaNextVideoConfig,
                          LlavaNextVideoForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas as internvl_canvas
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches as next_num_tiles
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_next_video.processing_llava_next_video import LlavaNextVideoProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches as ov_num_tiles
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen_image_resize
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize as qwen_video_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_video_resize

PAD, BOS, EOS = 0, 1, 2
IMAGE_ID, VIDEO_ID = 199, 198
VISION_START, VISION_END = 197, 196  # Qwen's <|vision_start|> / <|vision_end|> around every image / video
TEXT_IDS = (10, 190)  # ordinary text tokens are drawn from this range
VOCAB = 200

ROWS = ([3, "image", 5], [1, "image", 2])  # two prompts of different lengths, one image each
LLAVA_IMAGE_SIZES = ((40, 60), (64, 32))   # (H, W) of the raw images: different anyres grids
QWEN_IMAGE_SIZES = ((48, 64), (64, 32))    # -> grids (1, 6, 8) and (1, 8, 4) with patch 8
NEWLINES = 195  # Gemma 3's "\n\n" token around each image block
INTERNVL_IMAGE_SIZES = ((40, 120), (48, 48))  # -> 3 tiles + a thumbnail, and 1 tile, of 48 px


# ------------------------------------------------------------------------------------------------ factories

def _llama(**extra):
    return dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS, **extra)


def _clip(**extra):
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32, **extra)


def _merge(defaults: dict, overrides: dict) -> dict:
    out = dict(defaults)
    for key, value in overrides.items():
        if key in ("vision_config", "text_config") and isinstance(value, dict):
            out[key] = {**defaults[key], **value}
        else:
            out[key] = value
    return out


def _build(model_cls, config_cls, defaults: dict, overrides: dict):
    overrides = dict(overrides)
    attn = overrides.pop("attn_implementation", "sdpa")
    config = config_cls(**_merge(defaults, overrides))
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation=attn).eval()
    # Random weights emit any id. A generated <image> / <video> id is a placeholder again: with use_cache=False
    # generate re-runs the full sequence with the prompt's mm_encoder_outputs and the placeholder count check
    # fails (`Image features and image tokens do not match`), so greedy decoding never picks these ids.
    model.generation_config.suppress_tokens = [IMAGE_ID, VIDEO_ID, VISION_START, VISION_END]
    return model


def llava_next(**overrides) -> LlavaNextForConditionalGeneration:
    """CLIP 32 px / patch 8 (4x4 = 16 patches + CLS per tile, 2 layers, hidden 32) + Llama (2 layers, hidden 64);
    anyres pinpoints are the llava-v1.6 ones scaled 336 -> 32 px; `default` strategy, feature layer -2."""
    defaults = dict(vision_config=_clip(), text_config=_llama(), image_token_id=IMAGE_ID,
                    image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
                    vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=16)
    return _build(LlavaNextForConditionalGeneration, LlavaNextConfig, defaults, overrides)


def llava_onevision(**overrides) -> LlavaOnevisionForConditionalGeneration:
    """SigLIP 32 px / patch 8 (16 patches, no CLS, 2 layers, hidden 32) + Qwen2 (2 layers, hidden 64); pinpoints
    32 * (1..4) x 32 * (1..4) (the 384 * (1..6) grid scaled), so big images hit the anyres_max_9 down-scaling."""
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False)
    qwen2 = dict(_llama(), model_type="qwen2")
    defaults = dict(vision_config=siglip, text_config=qwen2, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                    image_grid_pinpoints=[[32 * i, 32 * j] for i in range(1, 5) for j in range(1, 5)],
                    vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    return _build(LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, defaults, overrides)


def llava_next_video(**overrides) -> LlavaNextVideoForConditionalGeneration:
    """As `llava_next` plus the video path: average pooling stride 2 (4x4 -> 2x2 tokens per frame)."""
    defaults = dict(vision_config=_clip(), text_config=_llama(), image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                    image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
                    vision_feature_select_strategy="default", vision_feature_layer=-2, spatial_pool_mode="average",
                    spatial_pool_stride=2, image_seq_length=16, video_seq_length=4)
    return _build(LlavaNextVideoForConditionalGeneration, LlavaNextVideoConfig, defaults, overrides)


def _qwen_text():
    # head_dim 16 -> 8 rotary frequencies, split [t, h, w] = [2, 3, 3] (the real [16, 24, 24] for head_dim 128)
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def qwen2_vl(**overrides) -> Qwen2VLForConditionalGeneration:
    """Vision: patch 8, temporal patch 2, merge 2 (one LLM token per 16x16 px), 2 blocks of width 32; text:
    Qwen2-VL text model (2 layers, hidden 64, M-RoPE sections [2, 3, 3])."""
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    defaults = dict(vision_config=vision, text_config=_qwen_text(), image_token_id=IMAGE_ID,
                    video_token_id=VIDEO_ID, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return _build(Qwen2VLForConditionalGeneration, Qwen2VLConfig, defaults, overrides)


def qwen2_5_vl(**overrides) -> Qwen2_5_VLForConditionalGeneration:
    """As `qwen2_vl`, with the 2.5 vision tower: window attention (window 32 px = 2x2 merged tokens) in block 0,
    full attention in block 1, SwiGLU MLP, tokens_per_second 4."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1],
                  tokens_per_second=4)
    defaults = dict(vision_config=vision, text_config=_qwen_text(), image_token_id=IMAGE_ID,
                    video_token_id=VIDEO_ID, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return _build(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, defaults, overrides)


def _qwen3_vl_parts(moe: bool) -> dict:
    # vision head_dim 16 (its 2-D rotary wants a multiple of 4); a 4 x 4 learned position grid; DeepStack
    # features from both vision blocks, added after text layers 0 and 1; text head_dim 16 with interleaved
    # M-RoPE sections [4, 2, 2] (the real [24, 20, 20] for head_dim 128)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    text = dict(_qwen_text(), head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return dict(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def qwen3_vl(**overrides) -> Qwen3VLForConditionalGeneration:
    """Vision: patch 8, temporal patch 2, merge 2, 2 blocks of width 32, DeepStack from both; text: Qwen3-VL text
    model (2 layers, hidden 64, q/k-norm, interleaved M-RoPE)."""
    return _build(Qwen3VLForConditionalGeneration, Qwen3VLConfig, _qwen3_vl_parts(False), overrides)


def qwen3_vl_moe(**overrides) -> Qwen3VLMoeForConditionalGeneration:
    """As `qwen3_vl`, with a mixture-of-experts MLP in every text layer (4 experts, 2 per token)."""
    return _build(Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeConfig, _qwen3_vl_parts(True), overrides)


def _qwen3_5_parts(moe: bool) -> dict:
    # vision as Qwen3-VL's without DeepStack; text: linear-attention (Gated DeltaNet) layers with a full-attention
    # layer every 4th (the real 3:1), gated q, q/k-norm, interleaved M-RoPE on half of head_dim 16 ([2, 1, 1])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16)
    text = dict(_qwen_text(), head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    return dict(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def _qwen3_5_layers(overrides: dict) -> dict:
    """`text_config={"num_hidden_layers": n}` keeps the 3:1 pattern (`layer_types` follow the count)."""
    text = overrides.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" in text and "layer_types" not in text:
        overrides = dict(overrides, text_config=dict(text, layer_types=[
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(text["num_hidden_layers"])]))
    return overrides


def qwen3_5(**overrides) -> Qwen3_5ForConditionalGeneration:
    """Qwen3.5: Qwen3-VL's vision (no DeepStack) + a hybrid text model (2 layers: linear, full by default; 4:
    three linear, one full)."""
    overrides = _qwen3_5_layers(overrides)
    defaults = _qwen3_5_parts(False)
    defaults["text_config"]["layer_types"] = ["linear_attention", "full_attention"]
    return _build(Qwen3_5ForConditionalGeneration, Qwen3_5Config, defaults, overrides)


def qwen3_5_moe(**overrides) -> Qwen3_5MoeForConditionalGeneration:
    """As `qwen3_5`, with mixture-of-experts MLPs (4 experts, 2 per token, a shared expert)."""
    overrides = _qwen3_5_layers(overrides)
    defaults = _qwen3_5_parts(True)
    defaults["text_config"]["layer_types"] = ["linear_attention", "full_attention"]
    return _build(Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeConfig, defaults, overrides)


def gemma3(**overrides) -> Gemma3ForConditionalGeneration:
    """SigLIP 32 px / patch 4 (64 patches, 2 layers, hidden 32), the projector's 2 x 2 average pool to 16 tokens per
    image (`mm_tokens_per_image`), + Gemma 3 (2 layers of hidden 64, head_dim 16, q/k-norm; sliding-window layers
    (window 8) and global ones alternating, local rotary base 1e4, global 1e6). Its projection weight, zeros at
    init, is drawn at random so the image features are not all zeros."""
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=4, vision_use_head=False)
    text = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"], pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS)
    defaults = dict(vision_config=siglip, text_config=text, mm_tokens_per_image=16, image_token_index=IMAGE_ID,
                    boi_token_index=VISION_START, eoi_token_index=VISION_END)
    overrides = dict(overrides)
    if "text_config" in overrides and "num_hidden_layers" in overrides["text_config"]:
        layers = overrides["text_config"]["num_hidden_layers"]  # the pattern continued: local, global, ...
        overrides["text_config"] = dict(overrides["text_config"], layer_types=[
            ("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    model = _build(Gemma3ForConditionalGeneration, Gemma3Config, defaults, overrides)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5,
                                                                             generator=torch.Generator().manual_seed(0))
    return model


def internvl(**overrides) -> InternVLForConditionalGeneration:
    """InternViT 48 px / patch 8 (36 patches + CLS, 2 layers, hidden 32), the `default` strategy dropping CLS, the
    2 x 2 pixel shuffle (9 tokens per tile: `image_seq_length` = (48 / 8)^2 / 4) + Qwen2 (2 layers, hidden 64)."""
    vision = dict(model_type="internvl_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=48, patch_size=8)
    defaults = dict(vision_config=vision, text_config=dict(_llama(), model_type="qwen2"), image_token_id=IMAGE_ID,
                    image_seq_length=9, downsample_ratio=0.5, vision_feature_layer=-1,
                    vision_feature_select_strategy="default")
    return _build(InternVLForConditionalGeneration, InternVLConfig, defaults, overrides)


FACTORIES = {"llava_next": llava_next, "llava_onevision": llava_onevision, "llava_next_video": llava_next_video,
             "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "qwen3_vl_moe": qwen3_vl_moe,
             "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe, "gemma3": gemma3, "internvl": internvl}


# ------------------------------------------------------------------------------------------------ inputs

class VLMInputs(dict):
    """Model keyword arguments; `.meta` records which images / videos belong to which row (for `take_row`)."""

    def __init__(self, data, meta):
        super().__init__(data)
        self.meta = meta


def _bare(cls, **attrs):
    """An instance of an HF processor class holding only `attrs`: its counting methods run unchanged."""
    obj = cls.__new__(cls)
    for key, value in attrs.items():
        setattr(obj, key, value)
    return obj


def _check_rows(rows, n_images, n_videos):
    images = sum(item == "image" for row in rows for item in row)
    videos = sum(item == "video" for row in rows for item in row)
    if images != n_images or videos != n_videos:
        raise ValueError(f"rows hold {images} images and {videos} videos, but {n_images} image sizes and "
                         f"{n_videos} videos were given")
    for row in rows:
        for item in row:
            if not (isinstance(item, int) or item in ("image", "video")):
                raise ValueError(f"row items are ints, 'image' or 'video'; got {item!r}")


def _tokens(rows, image_counts, video_counts, seed, bos, wrap):
    """Left-padded input_ids / attention_mask / mm_token_type_ids and the images and videos per row."""
    g = torch.Generator().manual_seed(seed)
    images, videos = iter(image_counts), iter(video_counts)
    ids, types, per_row_images, per_row_videos = [], [], [], []
    for row in rows:
        r, t = ([bos], [0]) if bos is not None else ([], [])
        n_img = n_vid = 0
        for item in row:
            if isinstance(item, int):
                r += torch.randint(*TEXT_IDS, (item,), generator=g).tolist()
                t += [0] * item
                continue
            count, token, kind = (next(images), IMAGE_ID, 1) if item == "image" else (next(videos), VIDEO_ID, 2)
            n_img, n_vid = n_img + (item == "image"), n_vid + (item == "video")
            pre, post = ([VISION_START], [VISION_END]) if wrap else ([], [])
            # a list: one run per frame, each after its timestamp text ("<0.5 seconds>": two tokens here)
            for stamp, n in ([(2, c) for c in count] if isinstance(count, list) else [(0, count)]):
                r += torch.randint(*TEXT_IDS, (stamp,), generator=g).tolist() + pre + [token] * n + post
                t += [0] * (stamp + len(pre)) + [kind] * n + [0] * len(post)
        ids.append(r)
        types.append(t)
        per_row_images.append(n_img)
        per_row_videos.append(n_vid)
    length = max(map(len, ids))
    pad = lambda r: [PAD] * (length - len(r)) + r  # noqa: E731
    input_ids = torch.tensor([pad(r) for r in ids])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in ids])
    mm_token_type_ids = torch.tensor([[0] * (length - len(t)) + t for t in types])
    return input_ids, attention_mask, mm_token_type_ids, per_row_images, per_row_videos


def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _llava_family_inputs(model, family, counter, num_tiles, rows, image_sizes, videos, seed):
    config = model.config
    rows, image_sizes, videos = [list(r) for r in rows], [tuple(s) for s in image_sizes], list(videos)
    _check_rows(rows, len(image_sizes), len(videos))
    side = config.vision_config.image_size
    per_row = [sum(item == "image" for item in row) for row in rows]
    batch_num_images = per_row
    # OneVision tiles only the images of single-image rows; a multi-image row gets the base tile only
    multi = [n != 1 for n in per_row for _ in range(n)]
    tiles = [1 if family == "llava_onevision" and m else num_tiles(list(s), config.image_grid_pinpoints, side)
             for s, m in zip(image_sizes, multi)]
    data, image_counts, video_counts = {}, [], []
    if image_sizes:
        pixel_values = torch.zeros(len(image_sizes), max(tiles), 3, side, side)
        for k, n in enumerate(tiles):
            pixel_values[k, :n] = _noise((n, 3, side, side), seed * 1000 + k)
        image_inputs = {"image_sizes": [list(s) for s in image_sizes], "pixel_values": pixel_values,
                        "batch_num_images": batch_num_images}
        image_counts = [counter.replace_image_token(image_inputs, k).count(counter.image_token)
                        for k in range(len(image_sizes))]
        data.update(pixel_values=pixel_values, image_sizes=torch.tensor(image_sizes, dtype=torch.long))
        if family == "llava_onevision":  # one entry per prompt that has images, as the processor nests them
            data["batch_num_images"] = torch.tensor([n for n in batch_num_images if n], dtype=torch.long)
    if videos:
        if len(set(videos)) != 1:
            raise ValueError("LLaVA video batches are one stacked tensor: all videos need the same frame count")
        pixel_values_videos = torch.stack([_noise((f, 3, side, side), seed * 1000 + 500 + k)
                                           for k, f in enumerate(videos)])
        video_inputs = {"pixel_values_videos": pixel_values_videos}
        video_counts = [counter.replace_video_token(video_inputs, k).count(counter.video_token)
                        for k in range(len(videos))]
        data["pixel_values_videos"] = pixel_values_videos
    input_ids, attention_mask, _, images_per_row, videos_per_row = _tokens(
        rows, image_counts, video_counts, seed, bos=BOS, wrap=False)
    meta = dict(family=family, rows=rows, images_per_row=images_per_row, videos_per_row=videos_per_row,
                tiles=tiles, image_tokens=image_counts, video_tokens=video_counts)
    return VLMInputs(dict(input_ids=input_ids, attention_mask=attention_mask, **data), meta)


def _next_counter(config, cls):
    vision = config.vision_config
    return _bare(cls, patch_size=vision.patch_size,
                 vision_feature_select_strategy=config.vision_feature_select_strategy,
                 # the llava-hf processor configs of CLIP towers set 1 (the CLS token), SigLIP towers 0
                 num_additional_image_tokens=int(vision.model_type == "clip_vision_model"),
                 image_token="<image>", video_token="<video>",
                 image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints))


def llava_next_inputs(model, rows=ROWS, image_sizes=LLAVA_IMAGE_SIZES, seed=1) -> VLMInputs:
    """input_ids, attention_mask, pixel_values [n_images, max_tiles, 3, S, S], image_sizes [n_images, 2] (H, W).

    The processor equivalent: LlavaNextProcessor(patch_size=p, vision_feature_select_strategy=config's,
    num_additional_image_tokens=1 for CLIP) with LlavaNextImageProcessor(size={"shortest_edge": S},
    crop_size={"height": S, "width": S}, image_grid_pinpoints=config's)."""
    counter = _next_counter(model.config, LlavaNextProcessor)
    return _llava_family_inputs(model, "llava_next", counter, next_num_tiles, rows, image_sizes, (), seed)


def llava_next_video_inputs(model, rows=ROWS, image_sizes=LLAVA_IMAGE_SIZES, videos=(), seed=1) -> VLMInputs:
    """As `llava_next_inputs`; `videos` are frame counts (frames already sampled and resized to S x S, as the
    LlavaNextVideoVideoProcessor does), giving pixel_values_videos [n_videos, frames, 3, S, S]."""
    counter = _next_counter(model.config, LlavaNextVideoProcessor)
    return _llava_family_inputs(model, "llava_next_video", counter, next_num_tiles, rows, image_sizes, videos, seed)


def llava_onevision_inputs(model, rows=ROWS, image_sizes=LLAVA_IMAGE_SIZES, videos=(), seed=1) -> VLMInputs:
    """input_ids, attention_mask, pixel_values [n_images, max_tiles, 3, S, S], image_sizes, batch_num_images
    (images per row: rows with several images get only the base tile and (S/p)^2 + 1 tokens per image),
    pixel_values_videos [n_videos, frames, 3, S, S] for `videos` (frame counts).

    The processor equivalent: LlavaOnevisionProcessor(num_image_tokens=(S/p)^2, vision_feature_select_strategy and
    vision_aspect_ratio = config's) with LlavaOnevisionImageProcessor(size={"height": S, "width": S},
    image_grid_pinpoints=config's) and LlavaOnevisionVideoProcessor(size={"height": S, "width": S})."""
    config = model.config
    vision = config.vision_config
    counter = _bare(LlavaOnevisionProcessor, num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                    vision_feature_select_strategy=config.vision_feature_select_strategy,
                    vision_aspect_ratio=config.vision_aspect_ratio, image_token="<image>", video_token="<video>",
                    image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints))
    return _llava_family_inputs(model, "llava_onevision", counter, ov_num_tiles, rows, image_sizes, videos, seed)


def _qwen_inputs(model, family, processor_cls, rows, image_sizes, videos, min_pixels, max_pixels, fps, seed,
                 video_resize=None):
    vision = model.config.vision_config
    rows, image_sizes = [list(r) for r in rows], [tuple(s) for s in image_sizes]
    videos = [tuple(v) for v in videos]
    _check_rows(rows, len(image_sizes), len(videos))
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    factor, dim = p * m, vision.in_channels * tp * p * p
    image_grid = []
    for h, w in image_sizes:
        rh, rw = qwen_image_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        image_grid.append([1, rh // p, rw // p])
    video_grid = []
    for frames, h, w in videos:
        if video_resize is None:
            rh, rw = qwen_video_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        else:
            rh, rw = video_resize(frames, h, w, temporal_factor=tp, factor=factor, min_pixels=min_pixels,
                                  max_pixels=max_pixels)
        video_grid.append([(frames + -frames % tp) // tp, rh // p, rw // p])  # last frame repeated to a multiple
    counter = _bare(processor_cls, image_token="<|image_pad|>", video_token="<|video_pad|>",
                    vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                    image_processor=SimpleNamespace(merge_size=m),
                    video_processor=SimpleNamespace(merge_size=m, temporal_patch_size=tp))
    data = {}
    image_counts = video_counts = []
    if image_grid:
        grid = torch.tensor(image_grid, dtype=torch.long)
        image_counts = [int(counter.replace_image_token({"image_grid_thw": grid}, k).count(counter.image_token))
                        for k in range(len(grid))]
        data["pixel_values"] = torch.cat([_noise((int(g.prod()), dim), seed * 1000 + k) for k, g in enumerate(grid)])
        data["image_grid_thw"] = grid
    if video_grid:
        grid = torch.tensor(video_grid, dtype=torch.long)
        metadata = [SimpleNamespace(fps=fps, frames_indices=list(range(f))) for f, _, _ in videos]
        runs = [counter.replace_video_token({"video_grid_thw": grid, "video_metadata": metadata}, k)
                for k in range(len(grid))]
        # Qwen3-VL: a run per temporal patch, each after its timestamp; earlier Qwens: one run
        video_counts = [[frame.count(counter.video_token) for frame in run.split(counter.vision_start_token)[1:]]
                        if family.startswith("qwen3") else run.count(counter.video_token) for run in runs]
        data["pixel_values_videos"] = torch.cat([_noise((int(g.prod()), dim), seed * 1000 + 500 + k)
                                                 for k, g in enumerate(grid)])
        data["video_grid_thw"] = grid
        if family == "qwen2_5_vl":
            data["second_per_grid_ts"] = torch.tensor([tp / fps] * len(video_grid))
    input_ids, attention_mask, mm_token_type_ids, images_per_row, videos_per_row = _tokens(
        rows, image_counts, video_counts, seed, bos=None, wrap=True)
    meta = dict(family=family, rows=rows, images_per_row=images_per_row, videos_per_row=videos_per_row,
                image_tokens=image_counts, video_tokens=video_counts)
    return VLMInputs(dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                          **data), meta)


def qwen3_vl_inputs(model, rows=ROWS, image_sizes=QWEN_IMAGE_SIZES, videos=(), min_pixels=4 * 16 * 16,
                    max_pixels=64 * 16 * 16, fps=2.0, seed=1) -> VLMInputs:
    """As `qwen2_vl_inputs`, with Qwen3-VL's video layout: each temporal patch of a video is its own run,
    `<{t:.1f} seconds><|vision_start|>` + (h*w / merge^2) `<|video_pad|>` + `<|vision_end|>` (the timestamp is
    two text tokens here), as `Qwen3VLProcessor.replace_video_token` writes it from the video's metadata (frames
    0..n-1 sampled at `fps`); video frames resized by Qwen3-VL's own `smart_resize`."""
    return _qwen_inputs(model, model.config.model_type, Qwen3VLProcessor, rows, image_sizes, videos, min_pixels,
                        max_pixels, fps, seed, video_resize=qwen3_video_resize)


def qwen2_vl_inputs(model, rows=ROWS, image_sizes=QWEN_IMAGE_SIZES, videos=(), min_pixels=4 * 16 * 16,
                    max_pixels=64 * 16 * 16, seed=1) -> VLMInputs:
    """input_ids (each image / video wrapped in vision_start / vision_end), attention_mask, mm_token_type_ids,
    pixel_values [sum t*h*w, 3*tp*p*p] + image_grid_thw, pixel_values_videos + video_grid_thw for `videos` given
    as (frames, H, W).

    The processor equivalent: Qwen2VLProcessor with Qwen2VLImageProcessor / Qwen2VLVideoProcessor(patch_size=p,
    merge_size=m, temporal_patch_size=tp, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}) and
    already sampled frames; the defaults are the real 56*56 .. 28*28*1280 rescaled to the tiny 16 px factor."""
    return _qwen_inputs(model, "qwen2_vl", Qwen2VLProcessor, rows, image_sizes, videos, min_pixels, max_pixels,
                        2.0, seed)


def qwen2_5_vl_inputs(model, rows=ROWS, image_sizes=QWEN_IMAGE_SIZES, videos=(), min_pixels=4 * 16 * 16,
                      max_pixels=64 * 16 * 16, fps=2.0, seed=1) -> VLMInputs:
    """As `qwen2_vl_inputs`, plus second_per_grid_ts = temporal_patch_size / fps per video (Qwen2_5_VLProcessor
    ._process_videos uses the sampled fps of the video metadata: 2 when the video processor samples a file at its
    default fps=2, 24 for a bare frame array without metadata)."""
    return _qwen_inputs(model, "qwen2_5_vl", Qwen2_5_VLProcessor, rows, image_sizes, videos, min_pixels,
                        max_pixels, fps, seed)


def gemma3_inputs(model, rows=ROWS, image_sizes=((32, 32), (32, 32)), crops=None, seed=1) -> VLMInputs:
    """input_ids with each image as Gemma3Processor lays it out: `"\n\n<start_of_image>" + mm_tokens_per_image
    soft tokens + "<end_of_image>\n\n"`, and with pan-and-scan crops (`crops`: per image, default none) its
    `replace_image_token` text "Here is the original image {block} and here are some crops to help you see better
    {block} {block} ..." (each run of plain words two text tokens here); attention_mask; token_type_ids (1 on the
    soft tokens, as the processor's `create_mm_token_type_ids`); pixel_values [images and crops, 3, S, S] in prompt
    order (each image, then its crops). The image sizes only name how many images there are: Gemma 3's image
    processor resizes every image (and crop) to S x S."""
    import re

    config = model.config
    side = config.vision_config.image_size
    rows, image_sizes = [list(r) for r in rows], list(image_sizes)
    _check_rows(rows, len(image_sizes), 0)
    crops = list(crops) if crops is not None else [0] * len(image_sizes)
    soft = "<image_soft_token>"
    # Gemma3Processor.__init__'s block (its tokenizer's boi / soft / eoi strings), then its own replacement
    counter = _bare(Gemma3Processor, full_image_sequence=f"\n\n<start_of_image>{soft * config.mm_tokens_per_image}"
                                                         f"<end_of_image>\n\n")
    special = {"\n\n": NEWLINES, "<start_of_image>": VISION_START, soft: IMAGE_ID, "<end_of_image>": VISION_END}
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(*TEXT_IDS, (n,), generator=g).tolist()  # noqa: E731

    def tokens(replacement: str) -> list:
        out = []
        for piece in re.split("(\n\n|<start_of_image>|<image_soft_token>|<end_of_image>)", replacement):
            out += [special[piece]] if piece in special else (text(2) if piece.strip() else [])
        return out

    images, ids, pixels = iter(range(len(image_sizes))), [], []
    for row in rows:
        r = [BOS]
        for item in row:
            if isinstance(item, int):
                r += text(item)
                continue
            k = next(images)
            r += tokens(counter.replace_image_token({"num_crops": crops}, k))
            pixels.append(_noise((1 + crops[k], 3, side, side), seed * 1000 + k))
        ids.append(r)
    length = max(map(len, ids))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in ids])
    data = dict(input_ids=input_ids, attention_mask=torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in ids]),
                token_type_ids=(input_ids == IMAGE_ID).long())
    if pixels:
        data["pixel_values"] = torch.cat(pixels)
    meta = dict(family="gemma3", rows=rows, images_per_row=[sum(i == "image" for i in row) for row in rows],
                videos_per_row=[0] * len(rows), pixels=[p.shape[0] for p in pixels], frames=[],
                image_tokens=[config.mm_tokens_per_image * (1 + c) for c in crops], video_tokens=[])
    return VLMInputs(data, meta)


def internvl_inputs(model, rows=ROWS, image_sizes=INTERNVL_IMAGE_SIZES, videos=(), max_patches=4, seed=1) -> VLMInputs:
    """input_ids (each image `<img>` + its tiles' context tokens + `</img>`; each video frame `Frame{i}: <img>` +
    one tile's tokens + `</img>`, frames joined by a newline), attention_mask, pixel_values
    [sum of tiles and frames, 3, S, S] in prompt order (images' and videos' tiles interleaved as they come, as
    InternVLProcessor merges them into one tensor). `videos` are frame counts (frames resized to S x S).

    The processor equivalent: InternVLProcessor(image_seq_length=config's) with GotOcr2ImageProcessor(
    crop_to_patches=True, min_patches=1, max_patches=max_patches, size=S x S): an image's tiles are its
    `get_optimal_tiled_canvas` grid plus a thumbnail where the grid has more than one tile
    (`get_number_of_image_patches`); the placeholder strings from `replace_image_token` / `replace_video_token`."""
    config = model.config
    side = config.vision_config.image_size[0]
    rows, image_sizes, videos = [list(r) for r in rows], [tuple(s) for s in image_sizes], list(videos)
    _check_rows(rows, len(image_sizes), len(videos))
    counter = _bare(InternVLProcessor, start_image_token="<img>", end_image_token="</img>",
                    image_token="<IMG_CONTEXT>", image_seq_length=config.image_seq_length)
    tiles = []
    for h, w in image_sizes:
        columns, grid_rows = internvl_canvas((h, w), (side, side), 1, max_patches)
        tiles.append(1 + columns * grid_rows if columns * grid_rows > 1 else 1)
    image_runs = [counter.replace_image_token({"num_patches": tiles}, k) for k in range(len(tiles))]
    clips = {"pixel_values_videos": [torch.zeros(f) for f in videos]}  # frames are what it reads
    video_runs = [counter.replace_video_token(clips, k) for k in range(len(videos))]
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(*TEXT_IDS, (n,), generator=g).tolist()  # noqa: E731
    images, clips = iter(range(len(tiles))), iter(range(len(videos)))
    ids, pixels, order = [], [], []
    for row in rows:
        r, row_order = [BOS], []
        for item in row:
            if isinstance(item, int):
                r += text(item)
                continue
            k = next(images) if item == "image" else next(clips)
            row_order.append((item, k))
            if item == "image":
                r += [VISION_START] + [IMAGE_ID] * image_runs[k].count(counter.image_token) + [VISION_END]
                pixels.append(_noise((tiles[k], 3, side, side), seed * 1000 + k))
            else:
                for frame in video_runs[k].split("\n"):  # "Frame{i}: " is two text tokens here
                    r += text(2) + [VISION_START] + [IMAGE_ID] * frame.count(counter.image_token) + [VISION_END]
                pixels.append(_noise((videos[k], 3, side, side), seed * 1000 + 500 + k))
        ids.append(r)
        order.append(row_order)
    length = max(map(len, ids))
    data = dict(input_ids=torch.tensor([[PAD] * (length - len(r)) + r for r in ids]),
                attention_mask=torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in ids]))
    if pixels:
        data["pixel_values"] = torch.cat(pixels)
    meta = dict(family="internvl", rows=rows, images_per_row=[sum(i == "image" for i in row) for row in rows],
                videos_per_row=[sum(i == "video" for i in row) for row in rows], tiles=tiles, frames=videos,
                pixels=[p.shape[0] for p in pixels], image_tokens=[run.count(counter.image_token) for run in image_runs],
                video_tokens=[run.count(counter.image_token) for run in video_runs])
    return VLMInputs(data, meta)


INPUTS = {"llava_next": llava_next_inputs, "llava_onevision": llava_onevision_inputs,
          "llava_next_video": llava_next_video_inputs, "qwen2_vl": qwen2_vl_inputs, "qwen2_5_vl": qwen2_5_vl_inputs,
          "qwen3_vl": qwen3_vl_inputs, "qwen3_vl_moe": qwen3_vl_inputs, "qwen3_5": qwen3_vl_inputs,
          "qwen3_5_moe": qwen3_vl_inputs, "gemma3": gemma3_inputs,
          "internvl": internvl_inputs}


def take_row(inputs: VLMInputs, i: int) -> VLMInputs:
    """Row i of a batch as a batch of one: no padding, only its own images and videos (tiles re-padded to its own
    maximum as the image processor would), so `generate` on it can be compared with row i of the batch."""
    meta = inputs.meta
    keep = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i][keep][None], "attention_mask": torch.ones(1, int(keep.sum()),
                                                                                            dtype=torch.long)}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i][keep][None]
    a = sum(meta["images_per_row"][:i])
    b = a + meta["images_per_row"][i]
    c = sum(meta["videos_per_row"][:i])
    d = c + meta["videos_per_row"][i]
    qwen = meta["family"].startswith("qwen")
    if "token_type_ids" in inputs:
        out["token_type_ids"] = inputs["token_type_ids"][i][keep][None]
    if meta["family"] in ("internvl", "gemma3"):  # one pixel tensor: images' and frames' tiles (crops) in order
        first = sum(meta["images_per_row"][:i]) + sum(meta["videos_per_row"][:i])
        starts = [0] + list(accumulate(meta["pixels"]))
        if b + d > a + c:
            out["pixel_values"] = inputs["pixel_values"][starts[first]:starts[first + b - a + d - c]]
    elif b > a:
        if qwen:
            _take_patches(inputs, out, "pixel_values", "image_grid_thw", a, b)
        else:
            out["pixel_values"] = inputs["pixel_values"][a:b, :max(meta["tiles"][a:b])]
            out["image_sizes"] = inputs["image_sizes"][a:b]
            if "batch_num_images" in inputs:
                out["batch_num_images"] = torch.tensor([b - a], dtype=torch.long)
    if d > c and meta["family"] not in ("internvl", "gemma3"):
        if qwen:
            _take_patches(inputs, out, "pixel_values_videos", "video_grid_thw", c, d)
            if "second_per_grid_ts" in inputs:
                out["second_per_grid_ts"] = inputs["second_per_grid_ts"][c:d]
        else:
            out["pixel_values_videos"] = inputs["pixel_values_videos"][c:d]
    row_meta = dict(meta, rows=[meta["rows"][i]], images_per_row=[b - a], videos_per_row=[d - c],
                    image_tokens=meta["image_tokens"][a:b], video_tokens=meta["video_tokens"][c:d])
    if "tiles" in meta:
        row_meta["tiles"] = meta["tiles"][a:b]
    if "pixels" in meta:
        row_meta["pixels"] = meta["pixels"][first:first + b - a + d - c]
        row_meta["frames"] = meta["frames"][c:d]
    return VLMInputs(out, row_meta)


def _take_patches(inputs, out, pixels: str, grids: str, a: int, b: int) -> None:
    """Qwen: images (or videos) a..b-1 of the batch into `out`: their rows of the flattened patches
    (t*h*w each, in order) and their grids."""
    grid = inputs[grids]
    starts = [0] + list(accumulate(grid.prod(-1).tolist()))
    out[pixels] = inputs[pixels][starts[a]:starts[b]]
    out[grids] = grid[a:b]


def greedy(model, inputs, max_new_tokens=4, **kwargs):
    """The new tokens of greedy `generate` (prompt stripped), right-padded with PAD to `max_new_tokens`: a batch
    pads a row that hit EOS with PAD while the others go on, a batch of one just stops, and this makes the two
    comparable."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return torch.nn.functional.pad(new, (0, max_new_tokens - new.shape[1]), value=PAD)


def count_placeholders(inputs) -> tuple[int, int]:
    """(image, video) placeholder tokens in the batch."""
    ids = inputs["input_ids"]
    return int((ids == IMAGE_ID).sum()), int((ids == VIDEO_ID).sum())


__all__ = ["llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "internvl",
           "llava_next_inputs", "llava_onevision_inputs", "llava_next_video_inputs", "qwen2_vl_inputs",
           "qwen2_5_vl_inputs", "qwen3_vl", "qwen3_vl_moe", "qwen3_vl_inputs", "qwen3_5", "qwen3_5_moe", "gemma3", "gemma3_inputs", "internvl_inputs",
           "take_row", "greedy", "count_placeholders", "VLMInputs", "FACTORIES", "INPUTS", "ROWS",
           "PAD", "BOS", "EOS", "IMAGE_ID", "VIDEO_ID", "VISION_START", "VISION_END"]
