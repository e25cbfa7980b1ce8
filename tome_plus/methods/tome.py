"""ToMe: bipartite soft matching.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv:2210.09461).
Implements the paper's Sec. 3 (bipartite soft matching on head-averaged keys, size-weighted
merge, proportional attention `softmax(QK^T / sqrt(d) + log s)`) and the constant / decreasing
schedules of its Appendix; METHODS.md section 1 gives the exact steps.

`bipartite_plan` is the matching other methods reuse: give it the two sides explicitly (PiToMe's
energy-ordered candidates, Zero-TPrune's importance partition) or let it split alternately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch

from ..merging import Plan
from ..state import TokenState
from ..triton_kernels.matching import bipartite_match
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
                   protected: Optional[torch.Tensor] = None) -> Plan:
    """Merge the `r` best-matched A tokens into their most similar B token.

    By default tokens split alternately by position, A = even, B = odd, and the `n_prefix`
    protected tokens leave both sides (ToMe's -inf row/column protection, generalised to any
    number of prefix tokens; keeping the absolute parity reproduces ToMe's merges exactly). Explicit `a_idx`/`b_idx` (`[B, Na]`, `[B, Nb]`) give other splits;
    `protected` (`[B, P]`) then lists tokens that pass untouched. Output order: prefix, protected,
    unmerged A (in position order), B.
    """
    batch, n_tokens, _ = metric.shape
    device = metric.device
    if a_idx is None:
        first_even = n_prefix + n_prefix % 2
        first_odd = n_prefix + 1 - n_prefix % 2
        a_idx = torch.arange(first_even, n_tokens, 2, device=device).expand(batch, -1)
        b_idx = torch.arange(first_odd, n_tokens, 2, device=device).expand(batch, -1)
    with torch.no_grad():
        node_max, node_idx = bipartite_match(metric, a_idx, b_idx)
        order = node_max.argsort(dim=-1, descending=True)
        src_rank, unm_rank = order[:, :r], order[:, r:]
        src = a_idx.gather(1, src_rank)
        unm = a_idx.gather(1, unm_rank).sort(dim=-1).values
        dst_in_b = node_idx.gather(1, src_rank)

    prefix = torch.arange(n_prefix, device=device).expand(batch, -1)
    parts = [prefix] + ([protected] if protected is not None else []) + [unm, b_idx]
    keep = torch.cat(parts, dim=1)
    dst = dst_in_b + (keep.shape[1] - b_idx.shape[1])
    return Plan(keep=keep, src=src, dst=dst)


@register
class Tome(Reducer):
    name = "tome"
    config_class = TomeConfig
    needs = frozenset({"keys"})
    budget_unit = "r"

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        return pairwise_limit(n_tokens, n_prefix)

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        return bipartite_plan(signals["keys"], n_remove, state.n_prefix)
