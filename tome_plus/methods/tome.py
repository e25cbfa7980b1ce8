"""ToMe: bipartite soft matching.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv:2210.09461).
Implements the paper's Sec. 3 (bipartite soft matching on head-averaged keys, size-weighted
merge, proportional attention `softmax(QK^T / sqrt(d) + log s)`) and the constant / decreasing
schedules of its Appendix; docs/methods.md (ToMe) gives the exact steps.

`bipartite_plan` is the matching other methods reuse: give it the two sides explicitly (PiToMe's
energy-ordered candidates, Zero-TPrune's importance partition) or let it split alternately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch

from ..merging import Plan
from ..state import TokenState
from ..triton_kernels import plan as plan_kernel
from .base import ReductionConfig, Reducer, register


@dataclass
class TomeConfig(ReductionConfig):
    """ToMe. Defaults as the paper: `prop_attn=True` (use False for MAE checkpoints); `r=16`."""

    default_budget: ClassVar[Dict[str, object]] = {"r": 16}


def pairwise_limit(n_tokens: int, n_prefix: int) -> int:
    """Most tokens one pairwise merge can remove: half of the reducible ones."""
    return max(n_tokens - n_prefix, 0) // 2


def bipartite_plan(metric: torch.Tensor, r: int, n_prefix: int,
                   a_idx: Optional[torch.Tensor] = None, b_idx: Optional[torch.Tensor] = None,
                   protected: Optional[torch.Tensor] = None, offset: int = 0) -> Plan:
    """Merge the `r` best-matched A tokens into their most similar B token.

    `metric` is `[B, N, C]`, or per-head keys `[B, H, N, D]` (cosine on their head average).
    By default tokens split alternately by position, A = even, B = odd, and the `n_prefix`
    protected tokens leave both sides (ToMe's -inf row/column protection, generalised to any
    number of prefix tokens; keeping the absolute parity reproduces ToMe's merges exactly).
    Explicit `a_idx`/`b_idx` (`[B, Na]`, `[B, Nb]`, positions counted from `offset`) give other
    splits; `protected` (same form) lists tokens that pass untouched. Output order: prefix,
    protected, unmerged A (both in position order), B. Ties go to the lower position. One fused
    launch on CUDA (`triton_kernels/plan.py`, which holds the PyTorch twin too).
    """
    if metric.dim() == 3:
        metric = metric.unsqueeze(1)
    out = plan_kernel.bipartite_plan(metric, r, n_prefix, a_idx, b_idx, protected, offset)
    return Plan(keep=out.keep, src=out.src, dst=out.dst, csr=out.csr)


@register
class Tome(Reducer):
    name = "tome"
    config_class = TomeConfig
    needs = frozenset({"k"})  # per-head keys: the plan kernel averages them itself
    budget_unit = "r"

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        return pairwise_limit(n_tokens, n_prefix)

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        return bipartite_plan(signals["k"], n_remove, state.n_prefix)
