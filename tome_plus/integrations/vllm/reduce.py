"""One image's (or video's) embeddings, as a vLLM model hands them to its language model,
reduced by the served vision method: the reducible tokens (a family's newline tokens aside,
which mark the grid's rows and stay) merged or pruned to the served count, every token kept in
its input order. The same computation as tome_plus's HF features site (`llm.features`)."""
from __future__ import annotations

from typing import Optional

import torch

from ...llm.features import reduce_sets
from .settings import Settings, check_count


def reduced_count(settings: Settings, total: int, newlines: int = 0) -> int:
    """Placeholders for an item of `total` embeddings, `newlines` of them newline tokens."""
    return newlines + check_count(settings, total - newlines)


def reduce_item(x: torch.Tensor, settings: Settings, newline: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`[T, D]` embeddings -> `[reduced_count, D]`; `newline`: the family's newline embedding."""
    reducible = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if newline is not None:
        reducible = ~(x == newline.to(x.dtype)).all(dim=-1)
    rows = reducible.nonzero()[:, 0]
    n_keep = check_count(settings, len(rows))
    if n_keep >= len(rows):
        return x
    kept, index = reduce_sets(x[rows].unsqueeze(0), settings.reducer, n_keep)
    kept_rows = rows[index[0]]
    out = x.clone()
    out[kept_rows] = kept[0].to(x.dtype)
    keep = ~reducible
    keep[kept_rows] = True
    return out[keep]
