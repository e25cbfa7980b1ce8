"""Tiny random-weight VLM checkpoints that vLLM loads offline: config, weights, a word-level
tokenizer and the processor configs, written by the transformers of the environment that runs
them (the vLLM environment has its own). Test helpers, no tests.

    save_llava(path)        LLaVA-1.5: CLIP 64 px tower (8 x 8 patches, 64 image tokens) + Llama
    save_llava_next(path)   LLaVA-NeXT: the same tower on anyres tiles of 64 px (grids up to 2 x 2) + Llama
    save_onevision(path)    LLaVA-OneVision: a SigLIP 64 px tower, anyres_max_9, videos pooled 2 x 2 + Qwen2
"""
from __future__ import annotations

import os

import torch

WORDS = [f"w{i}" for i in range(150)]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"


def tokenizer():
    """A word-level tokenizer: the special tokens, then w0 .. w149, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN})


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
