"""Which input patches each remaining token stands for, drawn over the image.

Every merged group is filled with the mean colour of its pixels and outlined; pruned patches
(held by no token) are shown dimmed. `source` is the `[N, N0]` (or `[B, N, N0]`) 0/1 map from
`tome_plus.inspect(model).source` after a forward with `trace_source=True`.
"""
from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


def _to_uint8_hwc(img: ImageLike) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    return arr


def group_map(source: torch.Tensor, grid: tuple, n_prefix: int) -> torch.Tensor:
    """`[gh, gw]` index of the token holding each patch, -1 where pruned."""
    patches = source[:, n_prefix:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"source covers {patches.shape[1]} patches but the image has a "
                         f"{grid[0]}x{grid[1]} grid; check patch_size and n_prefix")
    held = patches.sum(0) > 0
    return torch.where(held, patches.argmax(0), torch.full_like(held, -1, dtype=torch.long)).view(grid)


def make_visualization(img: ImageLike, source: torch.Tensor, patch_size: int,
                       n_prefix: Optional[int] = None, dim: float = 0.3,
                       border_color=(255, 255, 255)) -> Union[Image.Image, List[Image.Image]]:
    """Draw the token groups of `source` over `img`.

    Args:
        img: the image the model saw (PIL, HWC/CHW array or tensor); a batch `[B, 3, H, W]` with a
            `[B, N, N0]` source gives a list of images.
        source: 0/1 map `[N, N0]`: token i holds input token j.
        patch_size: the ViT's patch size (any).
        n_prefix: prefix columns of `source` (class, registers); by default what the grid leaves.
        dim: brightness factor for pruned patches.
        border_color: colour of the lines between groups.
    """
    if source.ndim == 3:
        if not (isinstance(img, (torch.Tensor, np.ndarray)) and np.ndim(img) == 4 and len(img) == len(source)):
            raise ValueError("a batched source [B, N, N0] needs a batch of B images [B, 3, H, W]")
        return [make_visualization(img[b], source[b], patch_size, n_prefix, dim, border_color)
                for b in range(source.shape[0])]
    pixels = _to_uint8_hwc(img)
    gh, gw = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    pixels = pixels[:gh * patch_size, :gw * patch_size].astype(np.float32)
    if n_prefix is None:
        n_prefix = source.shape[1] - gh * gw
    groups = group_map(source.detach().cpu(), (gh, gw), n_prefix).numpy()
    per_pixel = np.kron(groups, np.ones((patch_size, patch_size), dtype=groups.dtype))

    out = pixels * dim  # pruned patches stay as a dimmed image
    for g in np.unique(groups[groups >= 0]):
        mask = per_pixel == g
        out[mask] = pixels[mask].mean(axis=0)
    edge = np.zeros(per_pixel.shape, dtype=bool)
    edge[:, 1:] |= per_pixel[:, 1:] != per_pixel[:, :-1]
    edge[1:, :] |= per_pixel[1:, :] != per_pixel[:-1, :]
    out[edge] = border_color
    return Image.fromarray(out.round().astype(np.uint8))
