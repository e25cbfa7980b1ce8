"""Packed sequences: several prompts in one row, their position ids restarting at each prompt, no
attention mask and no cache (as training with packing feeds a model).

HF attends within each packed prompt only (`transformers.masking_utils.find_packed_sequence_indices`:
a new prompt wherever a position id does not follow the one before by 1). A pruning decoder must
also decide per prompt, as for the same prompts padded (FastV keeps a share of each instance's
image tokens). So it unpacks: the prompts become rows of a left-padded batch (`unpack`), the
decoder runs that batch, and the outputs go back to the packed positions (`repack`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .context import LlmInputs


@dataclass
class Packing:
    """Where each slot of the unpacked `[S, M]` batch comes from in the packed `[B, L]` rows."""

    row: torch.Tensor  # [S, M] packed row (0 at padding)
    column: torch.Tensor  # [S, M] packed column (0 at padding)
    real: torch.Tensor  # [S, M] bool: not padding
    shape: torch.Size  # the packed [B, L]


def sequence_ids(positions: torch.Tensor) -> Optional[torch.Tensor]:
    """`[B, L]` which packed prompt each token belongs to, or None where every row is one prompt;
    HF's rule (a new prompt wherever a position id is not the previous one plus 1)."""
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    ids = (step != 1).long().cumsum(dim=-1)
    return ids if bool(ids[:, -1].any()) else None


def packing(ids: torch.Tensor) -> Packing:
    """The unpacked layout of the prompts `ids` (`sequence_ids`) marks: one row each, left-padded."""
    batch, length = ids.shape
    counts = [torch.bincount(ids[b], minlength=int(ids[b, -1]) + 1) for b in range(batch)]
    lengths = torch.cat(counts)
    rows = torch.cat([torch.full((len(c),), b, dtype=torch.long) for b, c in enumerate(counts)])
    starts = torch.cat([c.cumsum(0) - c for c in counts])
    width = int(lengths.max())
    slot = torch.arange(width)
    pad = width - lengths
    real = slot[None, :] >= pad[:, None]
    column = (starts[:, None] + slot[None, :] - pad[:, None]).clamp(min=0) * real
    device = ids.device
    return Packing(row=(rows[:, None] * real).to(device), column=column.to(device), real=real.to(device),
                   shape=ids.shape)


def unpack(t: torch.Tensor, p: Packing, dim: int = 0, fill=0) -> torch.Tensor:
    """A packed `[..., B, L, ...]` tensor (rows at `dim`, columns next) as the unpacked batch,
    `fill` at padding."""
    moved = t.movedim((dim, dim + 1), (0, 1))
    out = moved[p.row, p.column]
    real = p.real.view(*p.real.shape, *([1] * (out.dim() - 2)))
    return torch.where(real, out, torch.full_like(out, fill)).movedim((0, 1), (dim, dim + 1))


def repack(t: torch.Tensor, p: Packing) -> torch.Tensor:
    """An unpacked `[S, M, ...]` tensor back at the packed positions `[B, L, ...]`."""
    out = t.new_zeros(*p.shape, *t.shape[2:])
    out[p.row[p.real], p.column[p.real]] = t[p.real]
    return out


def unpack_inputs(scope: Optional[LlmInputs], p: Packing) -> Optional[LlmInputs]:
    """The `LlmInputs` of the unpacked batch: per token as moved, each prompt's images counted and
    numbered from 0 (a prompt holds whole images)."""
    if scope is None or not scope.has_visual:
        return scope
    runs = unpack(scope.runs, p, fill=-1) if scope.runs is not None else None
    images = scope.images
    if runs is not None:
        first = torch.where(runs >= 0, runs, torch.full_like(runs, 1 << 30)).min(dim=1).values
        runs = torch.where(runs >= 0, runs - first[:, None], runs)
        images = (runs.max(dim=1).values + 1).clamp(min=0)
    return replace(scope, visual=unpack(scope.visual, p, fill=False), spatial=unpack(scope.spatial, p),
                   images=images, runs=runs,
                   answer=unpack(scope.answer, p, fill=False) if scope.answer is not None else None,
                   kept=[], positions=[])
