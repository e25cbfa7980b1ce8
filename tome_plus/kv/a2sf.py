"""A2SF: the KV cache pruned by accumulated attention with a forgetting factor.

Jo and Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in
Transformer Decoder", arXiv:2407.20485 (2024). Implements (docs/methods.md, A2SF):
- the accumulative attention score with forgetting factor, per layer and KV head:
  A[n, k] = sum over queries q <= n of alpha^(n - q) S[q, k], S the attention probabilities summed
  over the query heads that share the KV head (eq. 3; alpha = 1 is H2O's plain accumulation);
  after a forward of N queries the old scores fade by alpha^N and query q of them weighs
  alpha^(N-1-q);
- the selection: each layer and KV head keeps the `recent` newest tokens and the top
  `budget - recent` others by A; the rest leave K and V;
- when: once, after the prefill (the authors' code: scores over the prompt's queries; decode
  tokens are then appended), or also every `every` decode steps (`KvPolicy`).

How the scores are gathered and the cache pruned is the engine's (`kv/engine.py`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .engine import KvPolicy

SCORINGS = ("a2sf", "h2o", "window")


@dataclass
class A2sf(KvPolicy):
    """A2SF's KV-cache policy (`patch(..., kv="a2sf", kv_options={...})`); `budget`, `recent` and
    `every` as every policy's (`KvPolicy`).

    Attributes:
        forget: the forgetting factor alpha in (0, 1] (1: H2O's plain accumulation).
        scoring: "a2sf" (default), "h2o" (alpha = 1) or "window" (the newest `budget` only).
    """

    forget: float = 0.95
    scoring: str = "a2sf"

    name = "a2sf"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.scoring == "h2o":
            self.forget = 1.0
        if isinstance(self.forget, bool) or not isinstance(self.forget, (int, float)) or not 0.0 < self.forget <= 1.0:
            raise ValueError(f"forget must lie in (0, 1], got {self.forget!r}")

    @property
    def reads_attention(self) -> bool:
        return self.scoring != "window"

    def query_weights(self, n: int, device: torch.device) -> torch.Tensor:
        return float(self.forget) ** torch.arange(n - 1, -1, -1, device=device, dtype=torch.float32)

    def first_scored(self, n: int) -> int:
        """The queries older than `horizon(forget)` weigh, all together, under 2^-24 of the newest
        (weight 1): float32 cannot tell their share of a score the newer queries add to, so their
        probabilities are not formed (tested: the same slots kept)."""
        return max(n - horizon(self.forget), 0) if self.scoring == "a2sf" else 0

    def fade(self, n: int) -> float:
        return float(self.forget) ** n

    def rank(self, score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.scoring == "window":  # newest first: the slot index
            return torch.arange(valid.shape[-1], device=valid.device, dtype=torch.float32).expand(valid.shape)
        return score


def horizon(forget: float) -> int:
    """The fewest newest queries whose weights, `forget^t` for t = 0, 1, ..., leave a tail
    `sum_{t >= T} forget^t = forget^T / (1 - forget)` under 2^-24 (one float32 ulp of 1)."""
    if forget >= 1.0:
        return 1 << 62
    return max(1, math.ceil(math.log(2.0 ** -24 * (1.0 - forget)) / math.log(forget)))


POLICY = A2sf
