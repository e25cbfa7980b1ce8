"""FastV: training-free pruning of visual tokens inside the LLM of a LLaVA-style model.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models", ECCV 2024 (arXiv:2403.06764); docs/methods.md, FastV.

The paper's filtering layer K and ratio R: after the K-th decoder layer (counted from 1) the
visual tokens are ranked by the attention they received in that layer and the lowest R% are
dropped; the later layers (and their KV cache) never see them. K = 2, R = 50% is the paper's
headline setting. Here `k` is K: the attention of decoder layer index k - 1 (0-based) scores, and
the tokens leave before layer index k, so the first k layers see every token. `keep` is 1 - R.

Two ranking rules (`rank`):
- "mean" (the paper): the attention a visual token receives, averaged over heads and over all
  the prompt's query tokens (causal: the queries before it give it 0);
- "last" (the authors' released code): the last prompt token's attention row, averaged over heads.

Per instance the top ceil(keep * n_visual) visual tokens survive (the authors' code: round(),
`rounding="round"`; `preset="authors_code"` takes both their rank and their rounding) (with `tokens=N`: the top
N x the instance's images, the images counted from its visual tokens and the per-image count the
LLaVA backend knows) (ties by position); text tokens
always stay and survivors keep their position ids. The selection is ATP's zero-shot one
(`atp.top_fraction`); the decoder loop runs both (`llm/decoder.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch

from .atp import check_llm_budget, top_count, top_fraction
from .base import LlmReducer, LlmSite, ReductionConfig, is_int, received, register

RANKS = ("mean", "last")
ROUNDINGS = ("ceil", "round")
# preset -> (rank, rounding): the paper's rule, and the authors' released code (`topk(round(n (1 - R)))`
# over the last token's row)
PRESETS = {"paper": ("mean", "ceil"), "authors_code": ("last", "round")}


@dataclass
class FastvConfig(ReductionConfig):
    """FastV (LLaVA models only).

    Attributes:
        keep: fraction of the visual tokens kept after layer K (1 - the paper's R).
        tokens: instead of keep, exactly this many visual tokens kept per image after layer K (per
            instance: tokens x its images, at most the visual tokens it has).
        k: the paper's K: prune after the K-th decoder layer (scored with that layer's attention).
        rank: "mean" (attention received, averaged over heads and queries: the paper) or "last"
            (the last token's attention row: the authors' code); None: the preset's.
        rounding: how `keep` counts the kept tokens: "ceil" (ceil(keep n), at least the share
            asked for) or "round" (round(keep n), half to even: the authors' code); None: the preset's.
        preset: "paper" (rank="mean", rounding="ceil") or "authors_code" (rank="last",
            rounding="round"); `rank` and `rounding` given override it.
    """

    k: int = 2
    rank: Optional[str] = None
    rounding: Optional[str] = None
    preset: str = "paper"

    default_budget: ClassVar[Dict[str, object]] = {"keep": 0.5}
    default_prop_attn: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        rank, rounding = PRESETS[self.preset]
        self.rank = rank if self.rank is None else self.rank
        self.rounding = rounding if self.rounding is None else self.rounding
        super().__post_init__()
        check_llm_budget(self, "FastV", "of the visual tokens, after layer k", "visual tokens kept per image")
        if not is_int(self.k) or self.k < 1:
            raise ValueError(f"k must be an int >= 1 (prune after the k-th decoder layer), got {self.k!r}")
        self.k = int(self.k)
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")


def fastv_score(probs: torch.Tensor, visual: torch.Tensor, queries: torch.Tensor, rank: str) -> torch.Tensor:
    """Attention each token receives `[B, N]` (0 off the visual tokens).

    probs: `[B, H, N, P + N]` attention probabilities of the N current tokens over the keys, P of
    them cached (only the current tokens' keys are scored); queries: `[B, N]` the query tokens
    that count (the prompt's real tokens). "mean": averaged over heads and those queries;
    "last": the last of them, averaged over heads.
    """
    got = received(probs, query_weights(queries, rank))[:, 0]
    return torch.where(visual, got, torch.zeros_like(got))


def query_weights(queries: torch.Tensor, rank: str) -> torch.Tensor:
    """`[B, 1, N]`: "mean": the counted queries, each 1 / their number; "last": the last of them."""
    q = queries.float()
    if rank == "last":
        last = queries.long().cumsum(dim=1).argmax(dim=1)  # the first slot of the largest count: the last query
        q = torch.zeros_like(q).scatter_(1, last.unsqueeze(1), (q.sum(dim=1, keepdim=True) > 0).float())
    else:
        q = q / q.sum(dim=1, keepdim=True).clamp(min=1)
    return q.unsqueeze(1)


@register
class Fastv(LlmReducer):
    """Registered so `tome_plus.patch(llava, "fastv", k=2, keep=0.5)` finds it; the LLaVA backend
    runs it in the language model (`target = "llm"`)."""

    name = "fastv"
    config_class = FastvConfig

    def sites(self, depth: int) -> List[int]:
        """Decoder layers (0-based) after which tokens are pruned: the K-th, index k - 1."""
        if self.config.k > depth - 1:
            raise ValueError(f"k={self.config.k}: FastV prunes after one of the first {depth - 1} decoder layers of "
                             f"{depth} (after the last, nothing pruned would be used)")
        return [self.config.k - 1]

    def query_weights(self, visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor,
                      prompt: torch.Tensor, memo: Optional[torch.Tensor] = None) -> torch.Tensor:
        return query_weights(prompt & valid, self.config.rank)

    @property
    def one_query(self) -> bool:
        return self.config.rank == "last"

    def select(self, site: LlmSite) -> torch.Tensor:
        """The top `keep` of each instance's visual tokens by the attention they received, or
        `tokens` per image (`site.images`: the images each instance holds); text always."""
        score = torch.where(site.visual, site.received[:, 0], torch.zeros_like(site.received[:, 0]))
        if self.config.tokens is None and self.config.rounding == "round":
            n_visual = site.candidates.sum(dim=1)
            exact = torch.float32 if n_visual.device.type == "mps" else torch.float64  # MPS has no float64
            # torch.round goes half to even, as Python's round in their code
            return top_count(score, site.candidates, (n_visual.to(exact) * self.config.keep).round().long())
        if self.config.tokens is None:
            return top_fraction(score, site.candidates, self.config.keep)
        n_visual = site.candidates.sum(dim=1)
        return top_count(score, site.candidates, torch.minimum(site.images * self.config.tokens, n_visual))
