"""SnapKV: the prompt's KV cache compressed once, by what its last queries attend to.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You are
Looking for Before Generation", NeurIPS 2024 (arXiv:2404.14469; code FasterDecoding/SnapKV).
Implements (docs/methods.md, SnapKV), per layer and KV head, after the prefill:
- the vote: each prompt token's attention from the observation window, the last `window` prompt
  queries, summed over those queries (and over the query heads sharing the KV head);
- the clustering: the votes of the tokens before the window pooled along the sequence
  (`avg_pool1d` or `max_pool1d`, `kernel` wide, zero padding at the ends, stride 1);
- the selection: the top `budget - window` tokens before the window by the pooled vote (ties,
  which max pooling makes, to the higher own vote, then the earlier slot; the authors leave them
  to `topk`), plus the window itself; a prompt of at most `budget` tokens stays whole. Decode
  tokens are appended.

How the attention is gathered and the cache pruned is the engine's (`kv/engine.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from .engine import KvPolicy

POOLINGS = ("avg", "max")


@dataclass
class SnapKV(KvPolicy):
    """SnapKV's KV-cache policy (`patch(..., kv="snapkv", kv_options={...})`). Defaults: the
    authors' code (`max_capacity_prompt=2048`, `window_size=32`, `kernel_size=5`, `avgpool`).

    Attributes:
        budget: tokens each layer keeps per KV head, the window included (their
            `max_capacity_prompt`): an int, or a fraction (0, 1] of the prompt.
        window: the observation window: the last prompt queries that vote, kept whole (it is the
            policy's `recent`; give `window`, not `recent`).
        kernel: the pooling width (odd).
        pooling: "avg" (the authors' default) or "max".
    """

    budget: Union[int, float] = 2048
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    name = "snapkv"

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if self.recent is not None and self.recent != self.window:
            raise ValueError("snapkv keeps its observation window as the newest tokens: give window=, not recent=")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd int >= 1 (the pooling keeps each token's place), got "
                             f"{self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.every is not None:
            raise ValueError("snapkv compresses the prompt once, after the prefill; every= prunes while decoding "
                             "too: use kv='a2sf' for that")
        self.recent = self.window
        super().__post_init__()

    def query_weights(self, n: int, device: torch.device) -> torch.Tensor:
        weights = torch.zeros(n, device=device)
        weights[-self.window:] = 1.0  # the observation window votes
        return weights

    def first_scored(self, n: int) -> int:
        return max(n - self.window, 0)  # only the window's probabilities are formed

    def rank(self, score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # pool the votes of the tokens before the window alone (the window is kept whole):
        # padding and the window read as the zeros beyond the authors' sequence
        votes = score.masked_fill(~valid, 0.0)
        votes[..., -self.window:] = 0.0
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pooled = pool(votes, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        # pooling ties neighbours (a max spreads over its kernel): the token's own vote decides
        # between them, then its slot, so the kept set does not depend on topk's tie order
        by_vote = votes.argsort(dim=-1, descending=True, stable=True)
        order = by_vote.gather(-1, pooled.gather(-1, by_vote).argsort(dim=-1, descending=True, stable=True))
        places = torch.arange(order.shape[-1], 0, -1, device=score.device, dtype=torch.float32)
        return torch.empty_like(pooled).scatter_(-1, order, places.expand(order.shape))


POLICY = SnapKV
