"""Prompts of the families whose processors lay an image out beyond a run of placeholders
(InternVL's tiles between `<img>` and `</img>`, Gemma 3's image block), for `hf_shapes.make_batch`."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

# `<img>` and `</img>` around each image's run of `<IMG_CONTEXT>` (151667) in InternVL3's tokenizer: the Qwen2.5
# tokenizer's 151643..151664, then InternVL's own from 151665; not in the config, so here
INTERNVL_IMG_START, INTERNVL_IMG_END = 151665, 151666
# Gemma's "\n\n" token, around each image's <start_of_image> ... <end_of_image>
GEMMA3_NEWLINES = 108


def internvl_batch(config, media: Tuple[int, ...], text: torch.Tensor, before: int, generator: torch.Generator,
                   device: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """`make_batch` for InternVL: as its processor (GotOcr2 image processor, crop_to_patches, 1 to 12
    tiles) cuts the image: the best grid of S x S tiles for its aspect ratio, and a thumbnail of the
    whole image where the grid has more than one tile."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    if len(media) != 2:
        raise ValueError("InternVL shapes carry one image (H, W)")
    size = config.vision_config.image_size
    side = size[0] if isinstance(size, (list, tuple)) else size
    columns, rows = get_optimal_tiled_canvas(tuple(media), (side, side), 1, 12)
    tiles = 1 + columns * rows if columns * rows > 1 else 1
    batch = text.shape[0]
    pixels = torch.randn(batch * tiles, 3, side, side, generator=generator).to(device, dtype)  # each prompt's in turn
    run = torch.cat([torch.full((batch, 1), INTERNVL_IMG_START),
                     torch.full((batch, tiles * config.image_seq_length), config.image_token_id),
                     torch.full((batch, 1), INTERNVL_IMG_END)], dim=1)
    ids = torch.cat([text[:, :before], run, text[:, before:]], dim=1).to(device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def gemma3_batch(config, text: torch.Tensor, before: int, generator: torch.Generator, device: str,
                  dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """`make_batch` for Gemma 3: one image per prompt as Gemma3Processor lays it out (`"\n\n"`,
    `<start_of_image>`, `mm_tokens_per_image` soft tokens, `<end_of_image>`, `"\n\n"`), BOS first,
    `token_type_ids` 1 on the soft tokens (its image block attends both ways)."""
    batch = text.shape[0]
    side = config.vision_config.image_size
    pixels = torch.randn(batch, 3, side, side, generator=generator).to(device, dtype)
    column = lambda value, n=1: torch.full((batch, n), value)  # noqa: E731
    newlines = min(GEMMA3_NEWLINES, config.boi_token_id - 1)  # a tiny vocabulary's stand-in
    run = torch.cat([column(newlines), column(config.boi_token_id),
                     column(config.image_token_id, config.mm_tokens_per_image), column(config.eoi_token_id),
                     column(newlines)], dim=1)
    ids = torch.cat([text[:, :before], run, text[:, before:]], dim=1)
    ids[:, 0] = config.text_config.bos_token_id
    ids = ids.to(device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=(ids == config.image_token_id).long(),
                pixel_values=pixels)
