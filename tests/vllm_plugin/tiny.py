"""Tiny random-weight VLM checkpoints that vLLM loads offline: config, weights, a word-level
tokenizer and the processor configs, written by the transformers of the environment that runs
them (the vLLM environment has its own). Test helpers, no tests.

    save_llava(path)        LLaVA-1.5: CLIP 64 px tower (8 x 8 patches, 64 image tokens) + Llama
    save_llava_next(path)   LLaVA-NeXT: the same tower on anyres tiles of 64 px (grids up to 2 x 2) + Llama
    save_onevision(path)    LLaVA-OneVision: a SigLIP 64 px tower, anyres_max_9, videos pooled 2 x 2 + Qwen2
    save_qwen2_vl(path)     Qwen2-VL: patch 8, merge 2 (one token per 16 x 16 px, 4 .. 64 per image) + Qwen2 M-RoPE
    save_qwen2_5_vl(path)   Qwen2.5-VL: the same sizes, window attention, tokens_per_second 4
"""
from __future__ import annotations

import os

import torch

WORDS = [f"w{i}" for i in range(150)]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"


def tokenizer(image_token: str = IMAGE_TOKEN, video_token: str = VIDEO_TOKEN):
    """A word-level tokenizer: the special tokens (Qwen's too), then w0 .. w149, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(SPECIAL + QWEN_SPECIAL + WORDS)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>",
                                   extra_special_tokens={"image_token": image_token, "video_token": video_token})


PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]


def _configs(tok, layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=64)
    # head_dim 32: vLLM's CPU attention takes no smaller
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=1024)
    return dict(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                vision_feature_layer=-2, vision_feature_select_strategy="default")


def _save(build, processor, path: str, seed: int) -> str:
    """`build()` made under `seed` (every weight, the default init's too: the same checkpoint in
    every run), its 2-D weights redrawn larger, saved with the processor."""
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():  # larger weights than the default init: greedy answers depend on the image
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    hub_layout(os.path.join(path, "model.safetensors"))
    processor.save_pretrained(path)
    return os.fspath(path)


def save_llava(path: str, layers: int = 4, seed: int = 0) -> str:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    tok = tokenizer()
    image = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)
    return _save(lambda: LlavaForConditionalGeneration(LlavaConfig(**_configs(tok, layers))), processor, path, seed)


def save_onevision(path: str, layers: int = 4, seed: int = 0) -> str:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              Qwen2Config, SiglipVisionConfig)
    tok = tokenizer()
    common = _configs(tok, layers)
    llama = common["text_config"]
    text = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       max_position_embeddings=llama.max_position_embeddings)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                image_size=64, patch_size=8, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=common["image_token_id"],
                                  video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                                  vision_aspect_ratio="anyres_max_9")
    size = {"height": 64, "width": 64}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok, num_image_tokens=64,
        vision_feature_select_strategy="full", image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN)
    return _save(lambda: LlavaOnevisionForConditionalGeneration(config), processor, path, seed)


def save_llava_next(path: str, layers: int = 4, seed: int = 0) -> str:
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)
    tok = tokenizer()
    image = LlavaNextImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                    image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                                   num_additional_image_tokens=1)
    config = LlavaNextConfig(**_configs(tok, layers), image_grid_pinpoints=PINPOINTS)
    return _save(lambda: LlavaNextForConditionalGeneration(config), processor, path, seed)


def _save_qwen(model_cls, config_cls, processor_cls, vision: dict, path: str, layers: int, seed: int) -> str:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    tok = tokenizer("<|image_pad|>", "<|video_pad|>")
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    # head_dim 32 (vLLM's CPU attention takes no smaller): 16 rotary frequencies split [t, h, w] = [4, 6, 6]
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    config = config_cls(vision_config=vision, text_config=text, **ids)
    size = {"shortest_edge": 4 * 16 * 16, "longest_edge": 64 * 16 * 16}  # 4 .. 64 tokens per image
    common = dict(patch_size=8, merge_size=2, temporal_patch_size=2, size=size)
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(**common), tokenizer=tok,
                              video_processor=Qwen2VLVideoProcessor(**common))
    return _save(lambda: model_cls(config), processor, path, seed)


def save_qwen2_vl(path: str, layers: int = 4, seed: int = 0) -> str:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _save_qwen(Qwen2VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLProcessor, vision, path, layers, seed)


def save_qwen2_5_vl(path: str, layers: int = 4, seed: int = 0) -> str:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    # window 32 px = 2 x 2 merged tokens, full attention in the second block
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=128, num_heads=4, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1],
                  tokens_per_second=4)
    return _save_qwen(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, vision, path,
                      layers, seed)


def hub_layout(file: str) -> None:
    """The CLIP tower under `vision_tower.vision_model.*`, as the hub's LLaVA checkpoints hold it
    and vLLM loads it (this transformers writes `vision_tower.*`)."""
    from safetensors.torch import load_file, save_file
    weights = load_file(file)
    moved = {(f"vision_tower.vision_model.{k[len('vision_tower.'):]}"
              if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
             for k, v in weights.items()}
    save_file(moved, file, metadata={"format": "pt"})


def image(width: int, height: int, seed: int):
    """A seeded noise RGB image (PIL), the same in every environment."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# prompts of the vLLM tests: (text with one <image> per image, [(width, height, seed) per image])
PROMPTS = [("<s> w1 w2 <image> w3 w4", [(64, 64, 0)]),
           ("<s> w5 <image> w6 w7 w8 w9", [(120, 60, 1)]),
           ("<s> w10 <image> w11 <image> w12", [(64, 64, 2), (50, 110, 3)])]


def video(frames: int, width: int, height: int, seed: int):
    """A seeded noise clip, `[frames, height, width, 3]` uint8 (numpy), the same in every environment."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


# video prompts (OneVision): (text with one <video>, (frames, width, height, seed))
VIDEO_PROMPTS = [("<s> w1 <video> w2 w3", (4, 64, 64, 5)), ("<s> w4 w5 <video> w6", (4, 80, 48, 6))]

FPS = 2.0  # the clips' frame rate: Qwen2.5-VL's temporal positions step by 2 / FPS s x 4 tokens per s = 4


def video_metadata(frames: int) -> dict:
    """What a decoder reports for a clip of `frames` frames at `FPS`, every frame kept (no sampling)."""
    return {"fps": FPS, "duration": frames / FPS, "total_num_frames": frames, "frames_indices": list(range(frames))}


QWEN_IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"
QWEN_VIDEO = "<|vision_start|> <|video_pad|> <|vision_end|>"


def prompts(family: str, kind: str = "image"):
    """The test prompts for `family`: Qwen's wrap each item in vision_start / vision_end and take
    larger images (one token per 16 px): a tall one (more rows than columns: the text after it
    resumes past its rows, not its columns), clips whose extent is their rows or columns (where
    transformers 5.25 and vLLM 0.32 number the text after a Qwen2.5-VL clip alike; see
    `LONG_CLIP`)."""
    if not family.startswith("qwen"):
        return PROMPTS if kind == "image" else VIDEO_PROMPTS
    if kind == "image":
        return [("<s> w1 w2 " + QWEN_IMAGE + " w3 w4", [(96, 96, 0)]),
                ("<s> w5 " + QWEN_IMAGE + " w6 w7 w8 w9", [(64, 128, 1)]),
                ("<s> w10 " + QWEN_IMAGE + " w11 " + QWEN_IMAGE + " w12", [(128, 64, 2), (80, 112, 3)])]
    return [("<s> w1 " + QWEN_VIDEO + " w2 w3", (4, 48, 96, 5)), ("<s> w4 w5 " + QWEN_VIDEO + " w6", (2, 80, 64, 6))]


# a Qwen clip of 3 temporal steps (6 frames) of 4 x 4 tokens: on Qwen2.5-VL its temporal positions
# reach 8, past its rows and columns, and vLLM resumes the text after it there (as Qwen's original
# `get_rope_index`), transformers 5.25 after its rows and columns
LONG_CLIP = ("<s> w7 " + QWEN_VIDEO + " w8 w9", (6, 64, 64, 7))


def vllm_video(family: str, clip):
    """A clip as vLLM takes it: Qwen's with the decoder's metadata (FPS, no frame sampling)."""
    frames = video(*clip)
    if not family.startswith("qwen"):
        return frames
    return frames, dict(video_metadata(clip[0]), do_sample_frames=False)
