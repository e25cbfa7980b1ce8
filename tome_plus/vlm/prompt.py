"""A prompt's image placeholders: where they are (`image_mask`), each image's run cut to the count a
tower method leaves (`cut_placeholders`, the `tower` site), and what the language model is told
of the visual tokens at the `features` and `llm` sites (`llm_inputs`: which tokens are visual,
each image's run, SAP's grid score of each token).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..llm.context import LlmCall, LlmInputs
from ..llm.decoders import decoder_adapter
from ..methods.atp import spatial_score
from .families import family, packed
from .images import image_counts, tower


def image_mask(model: nn.Module, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """`[B, L]` True at the image placeholders (by id, or by embedding as HF does for embeds)."""
    image_id = model.config.image_token_id
    if input_ids is not None:
        return input_ids == image_id
    image_embed = model.get_input_embeddings()(torch.tensor(image_id, device=inputs_embeds.device))
    return (inputs_embeds == image_embed).all(-1)


def cut_placeholders(is_image: torch.Tensor, n_full: int, n_reduced: int, n_images: Optional[int],
                     tensors: Dict[str, Optional[torch.Tensor]], left: Optional[bool] = None) -> Dict[str, Any]:
    """Cut every image's placeholder run from `n_full` to its first `n_reduced` tokens.

    `tensors` maps "input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels" to
    `[B, L, ...]` tensors or None; returns them cut alike (rows re-padded: on the left when `left`,
    else on the side the batch was padded on), with "image_tokens" (`[B]`, what each row keeps),
    "removed" (how much shorter the batch became) and, where something was cut, "moved": `(rows,
    columns, new columns)` of every token kept (`cut[rows, new] = full[rows, columns]`). A prompt
    already at `n_reduced` per image passes unchanged; any other count raises. `n_images`: images
    given with the prompt (None: not known, e.g. a later turn with the cache; then every row must
    hold whole runs).
    """
    per_row = is_image.sum(dim=1).tolist()
    total = sum(per_row)
    out = dict(tensors, image_tokens=is_image.sum(dim=1), removed=0, has_images=total > 0)
    whole = lambda n: all(c % n == 0 for c in per_row)
    if n_full == n_reduced or total == 0:
        return out
    if n_images is not None:  # the images are known: the total says which count the prompt uses
        if total == n_images * n_reduced and whole(n_reduced):
            return out
        cut = total == n_images * n_full and whole(n_full)
    else:  # a later turn: the conversation as the caller has it holds whole processor runs
        if not whole(n_full) and whole(n_reduced):
            return out
        cut = whole(n_full)
    if not cut:
        images = f"{n_images} image(s)" if n_images is not None else "the images of this prompt"
        raise ValueError(f"the prompt holds {per_row} image tokens per sample for {images}; expected {n_full} per "
                         f"image (as the model's processor inserts them) or {n_reduced} (already reduced)")
    rank = is_image.long().cumsum(dim=1) - 1
    keep = ~is_image | (rank % n_full < n_reduced)  # the first n_reduced of every image's run
    counts = keep.sum(dim=1)
    length = int(counts.max())
    mask = tensors.get("attention_mask")
    if left is None:  # keep the batch's padding side (left if some row starts with padding)
        left = mask is not None and bool((mask[:, 0] == 0).any())
    start = (length - counts) if left else torch.zeros_like(counts)
    dest = start.unsqueeze(1) + keep.long().cumsum(dim=1) - 1
    rows, cols = keep.nonzero(as_tuple=True)
    new_cols = dest[rows, cols]

    def cut_tensor(t: Optional[torch.Tensor], fill) -> Optional[torch.Tensor]:
        if t is None:
            return None
        result = t.new_full((t.shape[0], length) + tuple(t.shape[2:]), fill)
        result[rows, new_cols] = t[rows, cols]
        return result

    if mask is None and bool((counts != length).any()):
        mask = torch.ones_like(is_image, dtype=torch.long)  # rows now differ in length: say where the pads are
    positions = tensors.get("position_ids")
    if positions is not None:
        if positions.dim() != 2:
            raise ValueError(f"position_ids of shape {tuple(positions.shape)}: tome_plus cuts [batch, length] ones")
        # as if the prompt had held fewer placeholders: later tokens move up by the cut ones before them
        positions = positions - (is_image & ~keep).long().cumsum(dim=1)
    out.update(input_ids=cut_tensor(tensors.get("input_ids"), tensors.get("pad_id", 0)),
               inputs_embeds=cut_tensor(tensors.get("inputs_embeds"), 0.0), attention_mask=cut_tensor(mask, 0),
               position_ids=cut_tensor(positions, 0), labels=cut_tensor(tensors.get("labels"), -100),
               image_tokens=(is_image & keep).sum(dim=1), removed=is_image.shape[1] - length,
               moved=(rows, cols, new_cols))
    return out


def pad_token_id(model: nn.Module) -> int:
    """The id a cut prompt's rows are padded with: the text model's pad token, the model's, or 0."""
    text = getattr(model.config, "text_config", None)
    for value in (getattr(text, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return value
    return 0


# a forward's arguments that carry images or videos (raw or encoded)
MEDIA = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "image_embeds", "video_embeds")


def carries(argument) -> bool:
    """Whether a `MEDIA` argument holds something (encoded outputs come as a dict, maybe empty)."""
    return argument is not None and (not isinstance(argument, dict) or bool(argument))


def llm_inputs(model: nn.Module, get: Callable[[str], Any], call: LlmCall) -> LlmInputs:
    """What ATP and FastV need to know of this forward's tokens: which are visual (image and video
    placeholders), each visual token's SAP grid score (its place in its image's grid; along the
    run where the run is not one grid), and how many images each row holds; with what the caller
    said (`call`: the prompt's length, the answer, soft masks). `get`: the forward's arguments by name."""
    ids, embeds = get("input_ids"), get("inputs_embeds")
    visual = image_mask(model, ids, embeds)
    video_id = getattr(model.config, "video_token_id", None)
    if video_id is not None and ids is not None:
        visual = visual | (ids == video_id)
    if not any(carries(get(name)) for name in MEDIA):
        # placeholders without their images or videos in this forward are plain tokens: a decoding
        # step that generated the placeholder id (HF passes the media to the prefill only)
        visual = torch.zeros_like(visual)
    spatial = torch.zeros(visual.shape, device=visual.device)
    images = torch.zeros(visual.shape[0], dtype=torch.long, device=visual.device)
    if bool(visual.any()) and not packed(model):
        # the grid from what every call path has: this call's pixels where it has them, else the
        # tower's configured size (generate encodes the images first and calls forward without
        # them); where the placeholder runs do not fit that grid, tokens are graded along the run
        pixels = get("pixel_values")
        vision = tower(model).config
        n_pixels = tuple(pixels.shape[-2:]) if pixels is not None else (vision.image_size,) * 2
        n_full, n_run = image_counts(model, n_pixels, get("vision_feature_layer"),
                                     get("vision_feature_select_strategy"))
        grid = (n_pixels[0] // vision.patch_size, n_pixels[1] // vision.patch_size)
        first = n_run - grid[0] * grid[1]  # a class token kept by the "full" strategy comes first
        if n_full == n_run and first in (0, 1):
            table = grid_scores(grid, first, visual.device)
        else:
            table = grid_scores((1, n_run), 0, visual.device)
        count = (visual.long().cumsum(dim=1) - 1).clamp(min=0)
        rank = count % n_run
        spatial = torch.where(visual, table[rank], spatial)
        images = (visual.sum(dim=1) + n_run - 1) // n_run  # runs of whole images, adjacent ones too
        runs = torch.where(visual, count // n_run, -1)
    elif bool(visual.any()):
        runs = run_numbers(visual)
        images, spatial = runs.max(dim=1).values + 1, scores_along_runs(runs)
    else:
        runs = None
    answer = call.answer
    if answer is not None and answer.shape != visual.shape:
        answer = None
    kinds, groups = get("token_type_ids"), None
    row = decoder_adapter(model.language_model)
    if kinds is not None and row is not None and row.bidirectional_image and kinds.shape == visual.shape:
        groups = run_numbers(kinds == 1)
    return LlmInputs(visual=visual, spatial=spatial, has_visual=bool(visual.any()), images=images, runs=runs,
                     newline=newline_of(model), soft=call.collect is not None,
                     prompt_length=call.prompt_length, answer=answer, attention_mask=get("attention_mask"),
                     groups=groups)


def run_numbers(member: torch.Tensor) -> torch.Tensor:
    """`[B, L]` the number of each member token's run of adjacent members in its row (0, 1, ...;
    -1 for the others): each image's (or video's) run at the features site, and Gemma 3's blocks
    whose tokens attend each other both ways, numbered as HF's Gemma 3 numbers them."""
    starts = member & ~torch.nn.functional.pad(member, (1, 0))[:, :-1]
    return torch.where(member, starts.long().cumsum(dim=1) - 1, -1)


def newline_of(model: nn.Module) -> Optional[torch.Tensor]:
    """The embedding of the family's newline token (its row's `newline` parameter), or None."""
    name = family(model).newline
    return getattr(model, name, None) if name is not None else None


def scores_along_runs(runs: torch.Tensor) -> torch.Tensor:
    """`[B, L]` SAP scores of the visual tokens graded along each placeholder run (a 1 x n grid
    per run of n tokens; `runs`: `run_numbers` of the visual tokens); 0 elsewhere."""
    spatial = torch.zeros(runs.shape, device=runs.device)
    for b in range(runs.shape[0]):
        for r in range(int(runs[b].max()) + 1):
            at = (runs[b] == r).nonzero().squeeze(1)
            spatial[b, at] = grid_scores((1, len(at)), 0, runs.device)
    return spatial


def grid_scores(grid: Tuple[int, int], first: int, device: torch.device) -> torch.Tensor:
    """SAP's score of each token of an image's run laid out as `grid` (`methods.atp.spatial_score`),
    after `first` tokens (a class token the "full" strategy keeps) that score 1."""
    table = spatial_score(grid, device)
    return torch.cat([table.new_ones(first), table]) if first else table
