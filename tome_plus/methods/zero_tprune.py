"""Zero-TPrune: zero-shot token pruning with the attention graph.

Wang, Dedhia, Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph
in Pre-Trained Transformers", CVPR 2024 (arXiv:2305.17328). Implements (docs/methods.md, Zero-TPrune):
- Weighted PageRank (WPR) per head, s_t = A^T s_{t-1}, class-token start sqrt(N) (or uniform),
  30 / 5 / 1 iterations in the first three / middle / last three layers (the paper gives the
  ranges 30-50, 5-10, 1; we take the cheap end);
- Emphasizing Informative Region (EIR): root-mean-square over heads, with the Variance-based Head
  Filter (VHF): a head counts when the variance of its importance over the reducible tokens lies
  in [0.01, 0.7]. The scale: the head's scores over the N_b alive reducible tokens (class,
  distillation and register tokens left out: the class token's mass, often most of the total,
  would otherwise set the variance alone), renormalised to mean 1, i.e. N_b s / sum s. Its variance
  is the squared coefficient of variation: 0 for a flat head, 0.01 a spread of 10% of the mean,
  0.7 a head that favours a few tokens. When fewer than `min_heads` of the heads pass, the heads
  nearest the range (in log variance) fill up to that share, so the importance does not jump
  between "every head" and "one head" from image to image; `min_heads=0` is the rule as
  the paper states it (the passing heads; every head when none passes);
- the order I' -> S -> I: one WPR step ranks the tokens; the S-stage partitions them by that
  importance (less important half as sources), matches each source to its most similar token of
  the other half by cosine on the keys and drops the sources of the best-matched pairs; the
  I-stage runs WPR on the survivors (rows renormalised over surviving keys) and keeps the top
  (where the graph is formed as it is read, at a VLM's features site: on the survivors' own
  graph, whose rows are those renormalised rows, at (N - r_s)^2 of the size).
Pruning only: sizes stay 1, so no proportional attention is needed. Attention probabilities are
computed only in the pruning layers; every other layer keeps fused attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from ..merging import Plan
from ..state import TokenState
from ..triton_kernels.matching import bipartite_match
from ..triton_kernels.pagerank import weighted_pagerank
from .base import ReductionConfig, Reducer, is_int, is_real, register


@dataclass
class ZeroTPruneConfig(ReductionConfig):
    """Zero-TPrune.

    Attributes:
        layers: the blocks that prune (after their attention); None: every block the budget
            gives tokens to.
        s_share: share of each layer's removal done by the S-stage (similarity); the I-stage
            (importance) removes the rest.
        iters: WPR iterations per layer (a list over all blocks); None: 30 in the first three
            blocks, 1 in the last three, 5 between.
        init: WPR start, "cls" (class token sqrt(N) times the others) or "uniform".
        var_range: VHF's [v_min, v_max] on the variance of each head's importance over the
            reducible tokens, scaled to mean 1 (see the module docstring).
        min_heads: share of the heads that VHF keeps at least: the passing heads, then the
            ones nearest the range; 0: the passing heads, or every head when none passes.
        prune_at: "attn" (prune between the block's attention and MLP) or "block" (after the whole
            block: the paper's pruning layer between blocks, fed by the block's attention).
            Pruning picks rows and the MLP works row by row, so both give the same output; "block"
            pays for the pruned tokens' MLP, as the paper's FLOPs count does, so a `flops` target
            solves to the paper's schedule there. "attn" is the default because it is cheaper for
            the same answer.
    """

    layers: Optional[Sequence[int]] = None
    s_share: float = 0.5
    iters: Optional[Sequence[int]] = None
    init: str = "cls"
    var_range: Tuple[float, float] = (0.01, 0.7)
    min_heads: float = 0.5
    prune_at: str = "attn"

    default_budget: ClassVar[Dict[str, object]] = {"flops": 0.65}  # the paper's DeiT-S setting: -34.7% FLOPs
    default_prop_attn: ClassVar[bool] = False  # pruning never merges: every size stays 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_real(self.s_share) or not 0.0 <= self.s_share <= 1.0:
            raise ValueError(f"s_share must lie in [0, 1], got {self.s_share}")
        if self.init not in ("cls", "uniform"):
            raise ValueError(f"init must be 'cls' or 'uniform', got {self.init!r}")
        if (not isinstance(self.var_range, (tuple, list)) or len(self.var_range) != 2
                or not all(is_real(v) for v in self.var_range)):
            raise ValueError(f"var_range must be (v_min, v_max), got {self.var_range!r}")
        lo, hi = self.var_range = (float(self.var_range[0]), float(self.var_range[1]))
        if not 0.0 <= lo <= hi:
            raise ValueError(f"var_range must be (v_min, v_max) with 0 <= v_min <= v_max, got {self.var_range}")
        if not is_real(self.min_heads) or not 0.0 <= self.min_heads <= 1.0:
            raise ValueError(f"min_heads is a share of the heads in [0, 1], got {self.min_heads!r}")
        if self.prune_at not in ("block", "attn"):
            raise ValueError(f"prune_at must be 'block' (between blocks, the paper) or 'attn' (between attention "
                             f"and MLP), got {self.prune_at!r}")
        if self.iters is not None:
            if not isinstance(self.iters, (list, tuple, range)):
                raise ValueError(f"iters must be a list with one iteration count per block, got {self.iters!r}")
            if any(not is_int(v) or v < 1 for v in self.iters):
                raise ValueError(f"iters must be positive integers, got {list(self.iters)}")
            self.iters = [int(v) for v in self.iters]
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple, range)):
                raise ValueError(f"layers must be a list of block indices, got {self.layers!r}")
            if any(not is_int(v) for v in self.layers):
                raise ValueError(f"layers must be block indices (ints), got {list(self.layers)}")
            if len(self.layers) == 0:
                raise ValueError("layers=[] prunes in no block; give the blocks that prune, or None for all")
            self.layers = [int(v) for v in self.layers]


def default_iters(depth: int) -> List[int]:
    return [30 if layer < 3 else 1 if layer >= depth - 3 else 5 for layer in range(depth)]


def head_variance(scores: torch.Tensor, alive: Optional[torch.Tensor], n_prefix: int) -> torch.Tensor:
    """VHF's statistic: `[B, H, N]` scores -> `[B, H]` variance of each head's importance over the
    alive reducible tokens (prefix left out), renormalised there to mean 1."""
    body = scores[..., n_prefix:]
    live = (alive[:, n_prefix:] if alive is not None else torch.ones_like(body[:, 0], dtype=torch.bool)).unsqueeze(1)
    n_live = live.sum(-1).clamp(min=1)
    scaled = body * (n_live / body.sum(-1).clamp(min=1e-30)).unsqueeze(-1)
    return ((scaled - 1.0).square() * live).sum(-1) / n_live


def aggregate_heads(scores: torch.Tensor, variance: torch.Tensor, var_range: Tuple[float, float],
                    min_heads: float = 0.0) -> torch.Tensor:
    """EIR with VHF: root-mean-square over the heads that pass, `[B, H, N]`, `[B, H]` -> `[B, N]`.

    A head passes when its variance lies in `var_range`; when fewer than `ceil(min_heads H)` pass,
    the heads nearest the range (distance in log variance; ties to the lower head) make up the
    number. `min_heads=0`: the passing heads, or every head when none passes.
    """
    lo, hi = var_range
    heads = variance.shape[-1]
    log_v = variance.clamp(min=1e-30).log()
    below = (math.log(lo) - log_v).clamp(min=0) if lo > 0 else torch.zeros_like(log_v)
    distance = below + (log_v - math.log(hi)).clamp(min=0) if hi > 0 else below + torch.inf
    passed = distance == 0
    need = math.ceil(min_heads * heads)
    if need == 0:
        passed = passed | ~passed.any(dim=-1, keepdim=True)
    else:
        rank = distance.argsort(dim=-1, stable=True).argsort(dim=-1)
        passed = passed | (rank < need)
    w = passed.float().unsqueeze(-1)
    return ((w * scores.square()).sum(1) / w.sum(1)).sqrt()


@register
class ZeroTPrune(Reducer):
    name = "zero_tprune"
    config_class = ZeroTPruneConfig
    needs = frozenset({"attn", "keys"})
    budget_unit = "r"
    merges = False

    def __init__(self, config: ZeroTPruneConfig) -> None:
        super().__init__(config)
        self.layer_set: Optional[FrozenSet[int]] = None if config.layers is None else frozenset(config.layers)
        self.iters: Optional[List[int]] = None if config.iters is None else list(config.iters)

    def check(self, depth: int) -> None:
        if self.layer_set is not None:
            outside = sorted(l for l in self.layer_set if not 0 <= l < depth)
            if outside:
                raise ValueError(f"layers {outside} do not exist: the model has blocks 0..{depth - 1}")
        if self.iters is None:
            self.iters = default_iters(depth)
        elif len(self.iters) != depth:
            raise ValueError(f"iters lists {len(self.iters)} layers but the model has {depth}")

    @property
    def site(self) -> str:
        return self.config.prune_at

    def active(self, layer: int) -> bool:
        return self.layer_set is None or layer in self.layer_set

    def needs_at(self, layer: int) -> FrozenSet[str]:
        return self.needs if self.active(layer) else frozenset()

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        # at least one reducible token survives
        return max(n_tokens - n_prefix - 1, 0) if self.active(layer) else 0

    def importance(self, attn: torch.Tensor, iters: int, alive: Optional[torch.Tensor], n_cls: int,
                   n_prefix: int) -> torch.Tensor:
        # the kernel's own variance spans the prefix too; VHF needs it over the reducible tokens
        scores, _ = weighted_pagerank(attn, iters, alive, self.config.init, n_cls)
        variance = head_variance(scores, alive, n_prefix)
        return aggregate_heads(scores, variance, self.config.var_range, self.config.min_heads)

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        attn, keys, p = signals["attn"], signals["keys"], state.n_prefix
        batch, n = attn.shape[0], attn.shape[-1]
        body = n - p
        n_cls = 1 if state.has_cls else 0
        # round half up (Python's round() would send 2.5 to 2 but 3.5 to 4)
        r_s = min(math.floor(n_remove * self.config.s_share + 0.5), body // 2)

        # I': one WPR step ranks the tokens; nothing is pruned yet
        with torch.no_grad():
            alive = torch.ones(batch, n, dtype=torch.bool, device=attn.device)
            if r_s > 0:
                # least important first; stable sorts throughout: ties go by position
                ranked = self.importance(attn, 1, None, n_cls, p)[:, p:].argsort(dim=-1, stable=True) + p
                sources, targets = ranked[:, :body // 2], ranked[:, body // 2:]
                best, _ = bipartite_match(keys, sources, targets)
                dropped = sources.gather(1, best.argsort(dim=-1, descending=True, stable=True)[:, :r_s])
                alive = alive.scatter(1, dropped, torch.zeros_like(dropped, dtype=torch.bool))
            # I: WPR on the survivors; keep the most important so that n_remove tokens go in all
            iters = self.iters[state.layer]
            if r_s > 0 and hasattr(attn, "among"):
                # a graph formed as read (the features site) is formed among the survivors alone:
                # a row renormalised over surviving keys is the softmax over them, and every row
                # keeps n - r_s tokens (the stable sort lists each row's survivors in order)
                index = alive.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :n - r_s]
                score = torch.full((batch, n), float("-inf"), device=attn.device).scatter(
                    1, index, self.importance(attn.among(index), iters, None, n_cls, p))
            else:
                score = self.importance(attn, iters, alive, n_cls, p).masked_fill(~alive, float("-inf"))
            score[:, :p] = float("inf")  # prefix tokens are never pruned
            # a stable sort, not topk: topk's order among equal scores is unspecified
            ranked = score.argsort(dim=-1, descending=True, stable=True)
            keep = ranked[:, :n - n_remove].sort(dim=-1).values
        return Plan(keep=keep)
