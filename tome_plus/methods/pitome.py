"""PiToMe: spectrum-preserving token merging.

Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024
(arXiv:2405.16148). Implements, per layer and on the non-protected tokens (docs/methods.md, PiToMe):
- the energy score, Eq. 4: E_i = (1/T) sum_{j != i} f_m(cos(k_i, k_j)),
  f_m(x) = x if x >= m else alpha (exp(x - m) - 1), with alpha = 1 and m_l = 0.9 - 0.9 l / L;
- Algorithm 1: the 2k highest-energy tokens are merge candidates, split alternately in energy
  order into A and B; every token of A merges into its most similar token of B (size-weighted);
  the other tokens pass untouched; proportional attention on.

Authors' code variants, offered by name: `energy="elu"` (E_i = mean_j ELU(W_ij - m, alpha)) and
`preset="deit_code"` (ToMe-style matching on the energy-ordered split in the first half of the
layers, margin 0.75 - 0.75 l / L, proportional attention off).

The metric: head-averaged keys between attention and MLP on timm ViTs (the paper); on HF CLIP /
SigLIP towers (LLaVA) the hidden state after the whole encoder layer, as the authors' LLaVA code
does (`metric="hidden"`, the default there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, FrozenSet, Optional, Union

import torch

from ..merging import Plan
from ..state import TokenState
from ..triton_kernels.energy import VARIANTS, energy_score
from .base import ReductionConfig, Reducer, is_real, register
from .tome import bipartite_plan, pairwise_limit

Margin = Union[float, Callable[[int, int], float]]
PRESETS = ("paper", "deit_code")


@dataclass
class PitomeConfig(ReductionConfig):
    """PiToMe. `keep` (the paper's r, fraction kept per layer) must be >= 0.5: the 2k merge
    candidates must fit among the T tokens.

    Attributes:
        energy: "paper" (Eq. 4) or "elu" (the authors' code); None: the preset's ("paper" for
            "paper", "elu" for "deit_code").
        margin: a constant m, or a callable `(layer, depth) -> m`; None: the preset's schedule
            (0.9 - 0.9 l / L for "paper", 0.75 - 0.75 l / L for "deit_code").
        alpha: scale of the exponential branch of f_m.
        preset: "paper" or "deit_code" (the authors' DeiT code path; also sets energy="elu" and
            prop_attn=False unless given).
        metric: "keys" (head-averaged keys, reduce between attention and MLP) or "hidden" (the
            layer's output hidden state, reduce after the MLP); None: "keys" on timm models,
            "hidden" on HF vision towers (the authors' code for each).
    """

    energy: Optional[str] = None
    margin: Optional[Margin] = None
    alpha: float = 1.0
    preset: str = "paper"
    metric: Optional[str] = None

    default_budget: ClassVar[Dict[str, object]] = {"keep": 0.9}

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.prop_attn is None:
            self.prop_attn = self.preset == "paper"
        if self.energy is None:
            self.energy = "paper" if self.preset == "paper" else "elu"
        super().__post_init__()
        if self.metric not in (None, "keys", "hidden"):
            raise ValueError(f"metric must be 'keys' or 'hidden', got {self.metric!r}")
        if self.energy not in VARIANTS:
            raise ValueError(f"energy must be one of {VARIANTS}, got {self.energy!r}")
        if self.margin is not None and not callable(self.margin) and not is_real(self.margin):
            raise ValueError(f"margin must be a number or a callable (layer, depth) -> m, got {self.margin!r}")
        if not is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        keeps = self.keep if isinstance(self.keep, (list, tuple)) else [self.keep]
        if self.keep is not None and any(k < 0.5 for k in keeps):
            raise ValueError(f"PiToMe needs keep >= 0.5 (got {self.keep!r}): a layer removes k = T - floor(T keep) "
                             f"tokens by merging the 2k highest-energy tokens pairwise, so 2k must fit in T")

    def margin_at(self, layer: int, depth: int) -> float:
        if callable(self.margin):
            return float(self.margin(layer, depth))
        if self.margin is not None:
            return float(self.margin)
        top = 0.9 if self.preset == "paper" else 0.75
        return top - top * layer / depth




@register
class Pitome(Reducer):
    name = "pitome"
    config_class = PitomeConfig
    needs = frozenset({"keys"})
    budget_unit = "keep"

    def for_family(self, family: str) -> None:
        if self.config.metric is None:
            self.config.metric = "hidden" if family == "hf" else "keys"

    @property
    def site(self) -> str:
        return "block" if self.config.metric == "hidden" else "attn"

    def needs_at(self, layer: int) -> FrozenSet[str]:
        return frozenset({"x"}) if self.config.metric == "hidden" else self.needs

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        return pairwise_limit(n_tokens, n_prefix)  # the 2k candidates pair up

    def keep_removal(self, t: int, keep: float) -> int:
        """The paper keeps floor(T keep) tokens; the authors' code removes floor(T - T keep)
        (19, not 20, of 196 at keep 0.9), computed in floating point exactly as written there."""
        if self.config.preset == "deit_code":
            return math.floor(t - t * keep)
        return super().keep_removal(t, keep)

    def uses_tome_matching(self, layer: int, depth: int) -> bool:
        """The authors' DeiT code runs ToMe's top-k matching in the first half of the layers."""
        return self.config.preset == "deit_code" and layer < math.ceil(depth / 2)

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        keys = signals["x"] if self.config.metric == "hidden" else signals["keys"]
        p, k = state.n_prefix, n_remove
        depth = len(state.removals)
        with torch.no_grad():  # energies only order the tokens
            energy = energy_score(keys[:, p:], self.config.margin_at(state.layer, depth), self.config.alpha,
                                  self.config.energy)
            # body positions (counted from p), highest energy first; equal energies in position order
            order = energy.argsort(dim=-1, descending=True, stable=True)
        if self.uses_tome_matching(state.layer, depth):
            return bipartite_plan(keys, k, p, order[:, 0::2], order[:, 1::2], offset=p)
        # the 2k highest-energy tokens pair up, A = even ranks, B = odd; the rest pass untouched.
        # All k tokens of A merge (r = |A|): no second top-k, unlike ToMe
        return bipartite_plan(keys, k, p, order[:, 0:2 * k:2], order[:, 1:2 * k:2],
                              protected=order[:, 2 * k:], offset=p)
