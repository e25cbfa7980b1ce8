"""PyramidDrop: visual tokens dropped in stages inside the LLM.

Xing, Chen, Huang, Wu, Zhang, Chen, Lin, Wang, Zhao, "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv:2410.17247; code:
Cooperx521/PyramidDrop). Implements (docs/methods.md, PyramidDrop) its inference rule:

- the LLM is split into S + 1 stages by the layers after which it drops (`layers`, counted from 1:
  the authors' [8, 16, 24] of 32; by default the quarters of the depth);
- at the end of stage s the visual tokens are ranked by the attention the last instruction token
  pays them, `softmax(q_last K^T / sqrt(d))` over every token it sees, averaged over heads (paper
  Eq. 2-3), formed as the authors do with the *next* layer's input norm, q and k (and rotary) on
  the stage's output; the top `int(n ratio_s)` of the image's original n tokens stay (ratio_s =
  lambda^s with the paper's lambda = 0.5: 50%, 25%, 12.5%), in order; text always stays;
- `positions="packed"` (their code): after each stage the survivors are numbered consecutively and
  every later token (decoding included) moves back by what the stage dropped; "kept" leaves every
  token at its position, as FastV.

Budgets: `keep=lambda` (one number: stage s keeps `int(n lambda^s)`) or `keep=[r_1, ..., r_S]` (the
authors' `image_token_ratio_list`, each of the original count); `tokens=T`: the last stage keeps
exactly T per image, stage s `int(n (T / n)^(s / S))`. Differences from their code, documented:
the probabilities in float32 (theirs: in the model's dtype after an fp32 softmax); a prompt whose
cache holds earlier turns ranks over this forward's tokens only (their code runs one turn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence

import torch

from .atp import top_count
from .base import LlmReducer, LlmSite, ReductionConfig, is_int, register
from .fastv import query_weights


@dataclass
class PyramidDropConfig(ReductionConfig):
    """PyramidDrop (vision-language models' language model: `site="llm"`).

    Attributes:
        layers: the decoder layers (counted from 1) after which visual tokens drop, increasing;
            None: the depth's quarters (8, 16, 24 of 32, the paper's).
        keep: the fraction lambda each stage keeps of the previous (one number, the paper's 0.5),
            or one fraction of the original count per stage (the authors' ratio list).
        tokens: instead, exactly this many visual tokens per image after the last stage.
        positions: "packed" (the authors' code: survivors renumbered after each stage) or "kept".
    """

    layers: Optional[Sequence[int]] = None
    positions: str = "packed"

    default_budget: ClassVar[Dict[str, object]] = {"keep": 0.5}
    default_prop_attn: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget[0] not in ("keep", "tokens"):
            raise ValueError("PyramidDrop takes its budget as keep (lambda per stage, or one fraction of the original "
                             "count per stage) or tokens (visual tokens per image after the last stage)")
        if self.layers is not None:
            layers = list(self.layers) if isinstance(self.layers, (list, tuple)) else None
            if not layers or not all(is_int(v) and v >= 1 for v in layers) or layers != sorted(set(layers)):
                raise ValueError(f"layers must be increasing ints >= 1 (after which decoder layers to drop, counted "
                                 f"from 1), got {self.layers!r}")
            self.layers = [int(v) for v in layers]
        if isinstance(self.keep, list):
            if self.keep != sorted(self.keep, reverse=True):
                raise ValueError(f"keep as a list is each stage's fraction of the original tokens, not increasing: "
                                 f"got {self.keep}")
            if self.layers is not None and len(self.keep) != len(self.layers):
                raise ValueError(f"keep gives {len(self.keep)} stage fractions for {len(self.layers)} layers")


@register
class PyramidDrop(LlmReducer):
    name = "pyramiddrop"
    config_class = PyramidDropConfig
    scores_next_layer = True

    def sites(self, depth: int) -> List[int]:
        """After the layers `layers` names (0-based: each minus one); each scored with the layer after."""
        layers = self.config.layers
        if layers is None:
            stages = len(self.config.keep) if isinstance(self.config.keep, list) else 3
            layers = sorted({max(depth * s // (stages + 1), 1) for s in range(1, stages + 1)})
        if layers[-1] > depth - 1:
            raise ValueError(f"layers={list(layers)}: PyramidDrop drops after one of the first {depth - 1} decoder "
                             f"layers of {depth} (it ranks with the layer after)")
        if isinstance(self.config.keep, list) and len(self.config.keep) != len(layers):
            raise ValueError(f"keep gives {len(self.config.keep)} stage fractions for {len(layers)} drop layers "
                             f"{list(layers)}")
        self._sites = [v - 1 for v in layers]
        return self._sites

    @property
    def one_query(self) -> bool:
        return True

    def query_weights(self, visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor,
                      prompt: torch.Tensor, memo: Optional[torch.Tensor] = None) -> torch.Tensor:
        return query_weights(prompt & valid, "last")  # the last instruction token

    def stage_count(self, stage: int, stages: int, n: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens kept after stage `stage` (1-based) of `stages`, from each row's original `n`."""
        exact = torch.float32 if n.device.type == "mps" else torch.float64
        n = n.to(exact)
        keep = self.config.keep
        if self.config.tokens is not None:
            final = torch.minimum(images.to(exact) * self.config.tokens, n)
            if stage == stages:
                return final.long()
            ratio = (final / n.clamp(min=1)) ** (stage / stages)
        else:
            ratio = keep[stage - 1] if isinstance(keep, list) else keep ** stage
        # int(): the authors' truncation; a tiny epsilon so 576 * 0.125 is 72, not 71.99999
        return (n * ratio + 1e-9).floor().long()

    def select(self, site: LlmSite) -> torch.Tensor:
        stage = self._sites.index(site.layer) + 1
        score = torch.where(site.visual, site.received[:, 0], torch.zeros_like(site.received[:, 0]))
        n_keep = self.stage_count(stage, len(self._sites), site.n_visual, site.images)
        return top_count(score, site.candidates, torch.minimum(n_keep, site.candidates.sum(dim=1)))
