"""DivPrune: diversity-based visual token pruning.

Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025 (arXiv:2503.02175; code: vbdi/divprune). Implements (docs/methods.md, DivPrune)
the paper's pruning as a Max-Min Diversity Problem, solved greedily, on each image's visual
tokens after the projector (tome_plus's features site):

- distance `d(i, j) = 1 - cos(x_i, x_j)` between the image's tokens (Eq. 3);
- the first token kept is the one farthest from its nearest neighbour, `argmax_i min_{j != i} d(i, j)`;
- then, until the budget is met, the token farthest from the kept set,
  `argmax_i min_{j in S} d(i, j)` (Eq. 4-5, Algorithm 1);
- the kept tokens stay in their input order; the rest are dropped (no merging).

The authors' code keeps `round(ratio n)` tokens with `ratio=0.098` by default (56 of LLaVA-1.5's
576): `keep=0.098` is this method's default budget and `keep=` rounds as theirs does. Ties go to
the lower index, as `torch.argmax` breaks them in their code. Their code selects among an image's
features as the projector gives them (LLaVA-NeXT: newline tokens included); the features site
keeps a family's newline tokens aside and selects among the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict

import torch
import torch.nn.functional as F

from ..merging import Plan
from ..state import TokenState
from .base import ReductionConfig, Reducer, register


@dataclass
class DivPruneConfig(ReductionConfig):
    """DivPrune. The authors' default budget, `keep=0.098` per image; no options of its own."""

    default_budget: ClassVar[Dict[str, object]] = {"keep": 0.098}
    default_prop_attn: ClassVar[bool] = False  # pruning never merges: every size stays 1


DUPLICATE = 1e-6  # cosine distances below this are rounding of a duplicate's 0 (float32 gives ~1e-7)


def max_min_diverse(x: torch.Tensor, n_keep: int) -> torch.Tensor:
    """`[B, N, C]` tokens -> `[B, n_keep]` indices, in the order the greedy max-min solver picks them."""
    unit = F.normalize(x.float(), dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, N, N]
    # duplicates (LLaVA-NeXT's base image and a 1 x 1 grid's tile, padding) are at distance 0, not at
    # whatever rounding leaves: the same choice on every backend and dtype
    distance = distance.masked_fill(distance < DUPLICATE, 0.0)
    batch, n, _ = distance.shape
    rows = torch.arange(batch, device=x.device)
    # a duplicate of an earlier token stands behind it: twins are equally far from the rest up to
    # rounding, which would otherwise choose between them (distances lie in [0, 2])
    earlier = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    behind = 4.0 * ((distance == 0) & earlier).any(dim=2)  # [B, N]
    # nearest-neighbour distance: the smallest off-diagonal entry of each column
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest = distance.masked_fill(eye, float("inf")).amin(dim=1) if n > 1 else distance[:, 0]
    picked = [(nearest - behind).argmax(dim=1)]
    farthest = distance[rows, picked[0]]  # [B, N] each token's distance to the kept set
    for _ in range(n_keep - 1):
        # a kept token never comes back (the authors' code could pick one again where rounding
        # leaves its distance to itself above a duplicate's)
        farthest[rows, picked[-1]] = -torch.inf
        picked.append((farthest - behind).argmax(dim=1))
        farthest = torch.minimum(farthest, distance[rows, picked[-1]])
    return torch.stack(picked, dim=1)


@register
class DivPrune(Reducer):
    name = "divprune"
    config_class = DivPruneConfig
    needs = frozenset({"x"})
    budget_unit = "r"
    merges = False
    vlm_sites = ("features",)

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        return max(n_tokens - n_prefix - 1, 0)  # one selection, down to one token

    def keep_removal(self, t: int, keep: float) -> int:
        return t - int(round(keep * t))  # the authors' count: round(ratio n) kept

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        x = signals["x"]
        prefix = state.n_prefix
        chosen = max_min_diverse(x[:, prefix:], x.shape[1] - prefix - n_remove).sort(dim=1).values + prefix
        head = torch.arange(prefix, device=x.device).expand(x.shape[0], prefix)
        return Plan(keep=torch.cat([head, chosen], dim=1))
