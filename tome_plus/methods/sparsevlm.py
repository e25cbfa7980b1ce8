"""SparseVLM: text-guided visual token sparsification inside the LLM, with recycling.

Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer, Zhang, "SparseVLM: Visual
Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025 (arXiv:2410.04417;
code: Theia-4869/SparseVLM, the release with the adaptive ratio). Implements (docs/methods.md,
SparseVLM) its inference rule:

- raters (Sec. 3.2): from the LLM's input embeddings, `m = mean_v softmax_t(V T^T)` over the
  visual tokens V and the text after the image T; the text tokens with `m` above its mean rate
  the image, at every pruning layer;
- at each pruning layer (`layers`, 0-based, their [1, 5, 14, 18] of 32; the layer's own attention,
  its output pruned), the raters' attention rows over the current visual tokens, averaged over
  heads (`R`, raters x visual), score each visual token by their mean; the adaptive count is
  `int(rank(R) scale + shift)` (Sec. 3.3: the rank of R measures the visual redundancy), the top
  that many stay in order; nothing is pruned where rank(R) is the visual count or the count
  reaches it;
- recycling (Sec. 3.4): of the pruned tokens, the top `int(0.3 n_pruned) + 1` by score are
  clustered (density-peak clustering with k-nearest neighbours, `int(0.1 n) + 1` clusters) and
  each cluster's mean becomes a token, placed after the kept visual tokens; it counts as visual
  at the later layers;
- `positions="packed"` (their code): the tokens after a pruning layer are numbered consecutively,
  decoding included; "kept": each keeps its position (a merged token its cluster centre's).

Budgets: the authors' settings by name, `tokens=192` (scale 13.5, shift 0), 128 (9, 6), 64 (0.8, 0)
(their README; the visual tokens averaged over the layers on LLaVA-1.5, not an exact count), or
`scale=` / `shift=` directly. Differences from their code, documented: float32 throughout (theirs
fp16); the density's random tie-break (noise of 1e-6 added to it) is the index here: of two tokens
of equal density (mutual nearest neighbours, frequent with few clusters) the lower is the denser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from .atp import top_count
from .base import LlmReducer, LlmSite, Recycled, ReductionConfig, is_int, is_real, register

# tokens= -> (scale, shift): the authors' settings for 192, 128 and 64 tokens on LLaVA-1.5
PRESETS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
AUTHORS_LAYERS = (1, 5, 14, 18)  # of 32
RECYCLE, CLUSTERS = 0.3, 0.1


@dataclass
class SparseVlmConfig(ReductionConfig):
    """SparseVLM (vision-language models' language model: `site="llm"`).

    Attributes:
        tokens: the authors' budget setting, 192, 128 or 64 (their scale and shift for it).
        scale, shift: the adaptive count `int(rank scale + shift)`; None: the `tokens` setting's.
        layers: decoder layers (0-based) whose output is pruned; None: their [1, 5, 14, 18] of 32,
            scaled to the depth.
        recycle: whether pruned tokens come back as merged cluster tokens (their code: True).
        positions: "packed" (their code: renumbered after each pruning layer) or "kept".
    """

    scale: Optional[float] = None
    shift: Optional[float] = None
    layers: Optional[Sequence[int]] = None
    recycle: bool = True
    positions: str = "packed"

    default_budget: ClassVar[Dict[str, object]] = {"tokens": 192}
    default_prop_attn: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget[0] != "tokens":
            raise ValueError("SparseVLM keeps an adaptive count, int(rank x scale + shift), not a fraction: give "
                             "tokens=192, 128 or 64 (the authors' settings) or scale= and shift=")
        if self.scale is None and self.tokens not in PRESETS:
            raise ValueError(f"tokens={self.tokens}: SparseVLM's authors set scale and shift for 192, 128 and 64 "
                             f"tokens only; give one of them or scale= (and shift=)")
        preset = PRESETS.get(self.tokens, (None, 0.0))
        self.scale = preset[0] if self.scale is None else self.scale
        self.shift = preset[1] if self.shift is None else self.shift
        for name in ("scale", "shift"):
            if not is_real(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.layers is not None:
            layers = list(self.layers) if isinstance(self.layers, (list, tuple)) else None
            if not layers or not all(is_int(v) and v >= 0 for v in layers) or layers != sorted(set(layers)):
                raise ValueError(f"layers must be increasing ints >= 0 (decoder layers whose output is pruned), "
                                 f"got {self.layers!r}")
            self.layers = [int(v) for v in layers]
        if not isinstance(self.recycle, bool):
            raise ValueError(f"recycle must be True or False, got {self.recycle!r}")


def raters(embeddings: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """`[B, N]` bool: the text tokens whose mean (over visual tokens) softmax share of `V T^T` is
    above the row's mean share."""
    e = embeddings.float()
    logits = (e @ e.transpose(1, 2)).masked_fill(~text[:, None, :], float("-inf"))  # [B, N (visual), N (text)]
    share = logits.softmax(dim=-1).nan_to_num(0.0) * visual[:, :, None]
    m = share.sum(dim=1) / visual.sum(dim=1, keepdim=True).clamp(min=1)  # [B, N]: mean over visual rows
    mean = (m * text).sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp(min=1)
    return text & (m > mean) & visual.any(dim=1, keepdim=True)


def cluster_and_merge(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering of `x` (`[M, C]`) into k clusters, each averaged: `[k, C]` merged
    tokens (by the centres' score, highest first) and the centres' indices into x."""
    d = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / x.shape[1] ** 0.5
    density = (-(d.topk(k, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    # [i, j]: j is denser than i; equal densities (mutual nearest neighbours, always with k = 2)
    # go to the lower index, where their code adds random noise (1e-6) to decide
    index = torch.arange(x.shape[0], device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None])
                                                      & (index[None, :] < index[:, None]))
    parent = torch.where(denser, d, d.max()).min(dim=-1).values
    centres = (parent * density).argsort(descending=True, stable=True)[:k]
    cluster = d[centres].argmin(dim=0)  # the nearest centre, the first on ties
    cluster[centres] = torch.arange(k, device=x.device)
    total = x.new_zeros(k, x.shape[1]).index_add_(0, cluster, x)
    count = torch.zeros(k, device=x.device, dtype=x.dtype).index_add_(0, cluster, torch.ones_like(x[:, 0]))
    return total / (count[:, None] + 1e-6), centres


@register
class SparseVlm(LlmReducer):
    name = "sparsevlm"
    config_class = SparseVlmConfig
    tokens_counted = False

    def sites(self, depth: int) -> List[int]:
        layers = self.config.layers
        if layers is None:
            layers = sorted({v * depth // 32 for v in AUTHORS_LAYERS})
        if layers[-1] > depth - 2:
            raise ValueError(f"layers={list(layers)}: SparseVLM prunes the output of one of the first {depth - 1} "
                             f"decoder layers of {depth} (after the last, nothing pruned would be used)")
        return list(layers)

    def forward_memo(self, embeddings: torch.Tensor, visual: torch.Tensor, instruction: torch.Tensor,
                     valid: torch.Tensor) -> Optional[torch.Tensor]:
        return raters(embeddings, visual & valid, instruction & ~visual & valid)

    def query_weights(self, visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor,
                      prompt: torch.Tensor, memo: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One weighting per rater, its own row (R = the batch's most raters; zero rows pad)."""
        rated = memo & valid
        count = int(rated.sum(dim=1).max()) if rated.numel() else 0
        order = rated.long().cumsum(dim=1) - 1  # each rater's number within its row
        rows = torch.arange(max(count, 1), device=visual.device)
        return ((order[:, None, :] == rows[None, :, None]) & rated[:, None, :]).float()

    def select(self, site: LlmSite):
        rated = site.memo & site.valid
        keep = torch.ones_like(site.visual)
        hidden, merged, rank = None, torch.zeros_like(site.visual), torch.zeros_like(site.index)
        for b in range(site.visual.shape[0]):  # their rule is per image prompt: counts differ per row
            n_raters = int(rated[b].sum())
            vis = site.candidates[b].nonzero()[:, 0]
            if n_raters == 0 or vis.numel() == 0:
                continue
            relation = site.received[b, :n_raters][:, vis]  # [raters, visual]
            r = int(torch.linalg.matrix_rank(relation.float()))
            n_keep = int(r * self.config.scale + self.config.shift)
            if r == vis.numel() or n_keep >= vis.numel():
                continue
            score = relation.mean(dim=0)
            kept = top_count(score[None], torch.ones_like(score, dtype=torch.bool)[None],
                             torch.tensor([max(n_keep, 0)], device=score.device))[0]
            keep[b, vis[~kept]] = False
            if not self.config.recycle:
                continue
            pruned = vis[~kept]
            n_recycled = int(pruned.numel() * RECYCLE) + 1
            picked = pruned[score[~kept].argsort(descending=True, stable=True)[:n_recycled]]
            n_clusters = int(n_recycled * CLUSTERS) + 1
            if hidden is None:
                hidden = site.hidden.clone()
            tokens, centres = cluster_and_merge(site.hidden[b, picked].float(), n_clusters)
            slots = picked[centres]  # each merged token takes its centre's slot
            hidden[b, slots] = tokens.to(hidden.dtype)
            keep[b, slots] = True
            merged[b, slots] = True
            rank[b, slots] = torch.arange(n_clusters, device=slots.device)
        if hidden is None:
            return keep
        return Recycled(keep=keep, hidden=hidden, merged=merged, rank=rank)
