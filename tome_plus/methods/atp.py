"""ATP: adaptive, instance-wise pruning of visual tokens inside the LLM of a LLaVA-style model.

Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", CVPR 2025
(arXiv:2412.00447); docs/methods.md, ATP. The authors published no code, and the parts of the
paper we could read give the design, not its constants; where a detail below is our choice it
says so.

An ATP module sits after a decoder layer and prunes visual tokens only (text tokens never):
- scores from that layer's attention probabilities (formed blockwise in that one layer):
  self-modal S_self(j), the attention visual token j receives from the visual queries that can
  see it, and cross-modal S_cross(j), from the text queries after the image (the instruction),
  each averaged over heads and queries, every weight scaled by the size of its query's causal
  window (so uniform attention scores 1 at every position: causal masking favours no token);
  the redundancy score is S_r = (S_self + S_cross) / 2 (our
  choice of combination; S_self alone where no text follows the image), used as its percentile
  among the instance's visual tokens;
- spatial augmented pruning (SAP): S_s(j) in (0, 1] grades token j's place on the image's 2-D
  grid, s / s_max with s the largest power of two dividing both grid coordinates (our choice):
  every threshold on it keeps a uniform grid sample (coarsest points first);
- a small MLP with two heads predicts per instance the thresholds theta_r, theta_s from the
  pooled visual and instruction states and the score quantiles (its inputs and widths are our
  choice); training uses the soft mask m = max(sigmoid(tau (S_r - theta_r)), sigmoid(tau (S_s -
  theta_s))), inference the hard rule "S_r > theta_r or S_s > theta_s", with the pruned tokens
  removed and the survivors keeping their position ids.

The budget `keep` is the visual-token fraction averaged over the LLM's layers (the paper reports
its 75% reduction as an average token count). Without trained weights (zero-shot), every module
keeps the same fraction f of the visual tokens reaching it, the top by S_r + S_s, with f solved
so that the layer average is `keep`. Module positions: the text we could access does not state
them; the default places modules after layers 4, 14 and 24 of 32, scaled to the model's depth
(our choice, configurable with `layers`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..warn import warn_caller
from .base import LlmReducer, LlmSite, ReductionConfig, is_int, is_real, received, register

PAPER_DEPTH, DEFAULT_LAYERS = 32, (4, 14, 24)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SPATIAL_INIT = 0.1


@dataclass
class AtpConfig(ReductionConfig):
    """ATP (LLaVA models only).

    Attributes:
        keep: target fraction of visual tokens, averaged over the LLM's layers (the training
            budget; zero-shot, what the modules keep).
        tokens: instead of keep, visual tokens per image averaged over the LLM's layers; `patch`
            turns it into keep = tokens / (image tokens per image at the tower's configured size,
            after the tower's own reduction if any) and fills in `keep`.
        weights: path of trained ATP weights (`tome_plus.atp.save`); None: zero-shot.
        layers: decoder layers after which a module prunes; None: 4, 14, 24 of 32, scaled.
        tau: temperature of the soft masks in training.
        budget_weight: weight of the budget loss (layer-averaged kept fraction - keep)^2.
        hidden: width of the threshold MLP.
        tower: a method for the vision tower too, e.g. {"method": "tome", "r": 8}; the tower
            then hands fewer image tokens to the LLM, in which ATP prunes further.
    """

    weights: Optional[str] = None
    layers: Optional[Sequence[int]] = None
    tau: float = 10.0
    budget_weight: float = 2.0
    hidden: int = 256
    tower: Optional[dict] = None

    default_budget: ClassVar[Dict[str, object]] = {"keep": 0.25}
    default_prop_attn: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_llm_budget(self, "ATP", "of visual tokens, averaged over layers",
                         "visual tokens per image, averaged over layers")
        if self.layers is not None:
            if not self.layers or not all(is_int(v) and v >= 0 for v in self.layers):
                raise ValueError(f"layers must be a non-empty list of decoder layer indices, got {self.layers!r}")
            self.layers = sorted(int(v) for v in self.layers)
        for name in ("tau", "budget_weight"):
            if not is_real(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not is_int(self.hidden) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {self.hidden!r}")
        if self.tower is not None and (not isinstance(self.tower, dict) or "method" not in self.tower):
            raise ValueError(f"tower must be a dict like {{'method': 'tome', 'r': 8}}, got {self.tower!r}")


def default_layers(depth: int) -> List[int]:
    """4, 14, 24 of 32 scaled to `depth` (distinct, inside the model)."""
    return sorted({min(depth - 2, max(0, round(p * depth / PAPER_DEPTH))) for p in DEFAULT_LAYERS})


def module_fraction(keep: float, layers: Sequence[int], depth: int) -> float:
    """The fraction f each module keeps so that the visual-token fraction averaged over the
    `depth` layers is `keep` (layers up to and including a module's see what reached it)."""
    def average(f: float) -> float:
        bounds = [-1] + list(layers) + [depth - 1]
        return sum((bounds[i + 1] - bounds[i]) * f ** i for i in range(len(bounds) - 1)) / depth
    if average(0.0) >= keep:  # even pruning everything after the first module cannot get lower
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) < keep else (lo, mid)
    return (lo + hi) / 2


def spatial_score(grid: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """SAP's grid score of every token of an `h x w` grid, row-major, in (0, 1]."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    both = (ys | xs).flatten()
    # the largest power of two dividing both coordinates (the origin divides by any)
    s_max = 1 << max(int(max(h, w) - 1).bit_length(), 0)
    stride = torch.where(both == 0, torch.full_like(both, s_max), both & -both)
    return stride.float() / s_max


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


class AtpModule(nn.Module):
    """One module's threshold predictor: per instance, (theta_r, theta_s)."""

    def __init__(self, dim: int, hidden: int, fraction: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim + len(QUANTILES), hidden), nn.GELU())
        self.head_r, self.head_s = nn.Linear(hidden, 1), nn.Linear(hidden, 1)
        for head in (self.head_r, self.head_s):
            nn.init.zeros_(head.weight)
        # thresholds live in (0, 1) like the scores (a sigmoid: no threshold can leave every mask
        # saturated, so the gradient never dies); untrained, theta_r prunes the lowest 1 - f by
        # redundancy and theta_s keeps a stride-4 grid (stride / s_max > SPATIAL_INIT for s_max <= 32):
        # enough tokens on the spatial branch for the max of the soft mask to send it gradient
        nn.init.constant_(self.head_r.bias, _logit(1.0 - fraction))
        nn.init.constant_(self.head_s.bias, _logit(SPATIAL_INIT))

    def forward(self, visual_state: torch.Tensor, text_state: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """`[B, C]` pooled states, `[B, N]` percentile scores (nan off the visual tokens) -> `[B, 2]`
        thresholds (theta_r, theta_s) in (0, 1)."""
        quantiles = torch.nanquantile(score.float(), torch.tensor(QUANTILES, device=score.device), dim=1).T
        # in the modules' dtype (they follow the model's: `follow`); LayerNorm refuses a mixed one
        pooled = torch.cat([visual_state, text_state], -1).to(self.norm.weight.dtype)
        z = torch.cat([self.norm(pooled), quantiles.nan_to_num(0.5)], -1)
        z = self.mlp(z.to(self.head_r.weight.dtype))
        return torch.sigmoid(torch.cat([self.head_r(z), self.head_s(z)], dim=-1).float())


class AtpModules(nn.Module):
    """All modules of one model (the trainable part, saved and loaded on its own)."""

    def __init__(self, layers: Sequence[int], dim: int, hidden: int, fraction: float) -> None:
        super().__init__()
        self.layers = list(layers)
        self.fraction = fraction  # zero-shot: what each module keeps
        self.modules_ = nn.ModuleList(AtpModule(dim, hidden, fraction) for _ in layers)
        self.register_buffer("trained", torch.tensor(False))  # thresholds decide once trained or loaded

    def at(self, layer: int) -> Optional[AtpModule]:
        return self.modules_[self.layers.index(layer)] if layer in self.layers else None


def follow(modules: nn.Module, like: torch.Tensor) -> nn.Module:
    """`modules` on `like`'s device and in its dtype, moved once where they differ. They live on the
    patch record, not in the model's module tree, so the model's `.to()` does not move them; a
    host-side comparison, no sync. Used by `Atp.select` and by `tome_plus.atp.train`."""
    param = next(modules.parameters())
    if param.device != like.device or param.dtype != like.dtype:
        modules.to(device=like.device, dtype=like.dtype)  # in place: an optimizer's parameters stay its own
    return modules


def scores(probs: torch.Tensor, visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor
           ) -> torch.Tensor:
    """Redundancy score S_r `[B, N]` (0 off the visual tokens) from one layer's attention.

    probs: `[B, H, N, P + N]` attention probabilities of the current N tokens (queries) over the
    keys, P of them cached (only the current tokens' keys are scored);
    visual / instruction / valid: `[B, N]` masks of the visual tokens, the text after the image
    and the real (non-padding) tokens.

    Each weight a_ij is scaled by the number of keys query i sees (its causal window), so uniform
    attention scores 1 wherever the query sits: causal masking favours no image position.
    """
    weights = score_weights(visual, instruction, valid)
    return combine(received(probs, weights), visual, instruction, valid)


def score_weights(visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B, 2, N]`: the visual queries and the instruction's, each scaled by its causal window."""
    window = valid.float().cumsum(dim=1).clamp(min=1)  # keys each query sees
    return torch.stack([(visual & valid).float() * window, (instruction & valid).float() * window], dim=1)


def combine(received_: torch.Tensor, visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor
            ) -> torch.Tensor:
    """S_r from the attention received from the two weightings of `score_weights`."""
    q_visual = (visual & valid).float()
    # self-modal: mean over the visual queries that can see key j (causal: those at or after j)
    seen_by = torch.flip(torch.cumsum(torch.flip(q_visual, [1]), 1), [1]).clamp(min=1)
    s_self = received_[:, 0] / seen_by
    n_text = (instruction & valid).float().sum(dim=1, keepdim=True)
    s_cross = received_[:, 1] / n_text.clamp(min=1)
    combined = torch.where(n_text > 0, (s_self + s_cross) / 2, s_self)
    return torch.where(visual, combined, torch.zeros_like(combined))


def percentile(score: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Each visual token's score as its rank among the instance's visual tokens, in (0, 1]
    (ties by position); nan elsewhere."""
    masked = torch.where(visual, score, torch.full_like(score, -math.inf))
    order = masked.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    n_visual = visual.sum(dim=1, keepdim=True)
    pct = (ranks - (order.shape[1] - n_visual) + 1).float() / n_visual.clamp(min=1).float()
    return torch.where(visual, pct, torch.full_like(pct, math.nan))


def check_llm_budget(config: ReductionConfig, method: str, keep_means: str, tokens_mean: str) -> None:
    """An LLM-side method's budget is one keep fraction or a token count (no r, flops, lists)."""
    if config.budget[0] not in ("keep", "tokens") or isinstance(config.keep, list):
        raise ValueError(f"{method} takes its budget as one keep fraction ({keep_means}) or tokens ({tokens_mean})")


def top_fraction(score: torch.Tensor, visual: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep mask `[B, N]` (bool): per instance the top ceil(fraction * n_visual) visual tokens by
    `score` (ties by position, the earlier first), every other token kept. Shared by ATP's
    zero-shot modules and FastV (`methods/fastv.py`)."""
    n_visual = visual.sum(dim=1)
    # float64 and a tiny epsilon: 576 * (64 / 576) is 64, not 64.00001 ceiled to 65
    exact = torch.float32 if n_visual.device.type == "mps" else torch.float64
    n_keep = (n_visual.to(exact) * fraction - 1e-6).ceil().clamp(min=0).long()
    return top_count(score, visual, n_keep)


def top_count(score: torch.Tensor, visual: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Keep mask `[B, N]` (bool): per instance the top `n_keep[b]` visual tokens by `score` (ties
    by position, the earlier first), every other token kept."""
    masked = torch.where(visual, score, torch.full_like(score, -math.inf))
    rank = masked.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
    return ~visual | (rank < n_keep.unsqueeze(1))


def load_modules(modules: AtpModules, path: str) -> None:
    """Trained ATP weights (as `tome_plus.atp.save` writes them) into `modules`; marks them trained.
    `patch(llava, "atp", weights=path)` (`Atp.prepare`) and `tome_plus.atp.load` both load through
    it, so the file is checked one way."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved.get("modules", saved)
    if "layers" in saved and list(saved["layers"]) != list(modules.layers):
        raise ValueError(f"{path} holds ATP modules for decoder layers {list(saved['layers'])}, not "
                         f"{list(modules.layers)}: patch with layers={list(saved['layers'])}")
    missing, unexpected = modules.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit these ATP modules (layers, widths): missing {missing}, "
                         f"unexpected {unexpected}")
    modules.trained.fill_(True)


@register
class Atp(LlmReducer):
    """Registered so `tome_plus.patch(llava, "atp", ...)` finds it; the decoder loop runs it in the
    language model (`target = "llm"`): its modules after `sites`, each deciding from one layer's
    attention and hidden states."""

    name = "atp"
    config_class = AtpConfig

    def sites(self, depth: int) -> List[int]:
        layers = self.config.layers if self.config.layers is not None else default_layers(depth)
        if layers[-1] >= depth - 1:
            raise ValueError(f"ATP modules go after decoder layers 0..{depth - 2} (a module after the last layer "
                             f"would prune nothing that is used), got {self.config.layers}")
        return list(layers)

    def prepare(self, llm: nn.Module, info, per_image: Optional[int]) -> AtpModules:
        """The modules, zero-shot (each keeps the fraction that makes the layer average `keep`) or
        with the trained `weights`; `tokens=` becomes `keep`, a fraction of `per_image`."""
        if self.config.tokens is not None:
            if per_image is None:
                raise ValueError("ATP's tokens= is a fraction of a fixed image-token count per image, which this "
                                 "model's images (anyres, native resolution: each its own count) do not have; use keep=")
            self.config.keep = self.config.tokens / per_image
        layers, depth = self.sites(len(llm.layers)), len(llm.layers)
        fraction = module_fraction(self.config.keep, layers, depth)
        if fraction == 0.0:
            warn_caller(f"keep={self.config.keep} is at or below what ATP reaches with modules after layers {layers} "
                        f"of {depth} (the layers up to the first module see every visual token): the modules prune "
                        f"every visual token; move the first module earlier (layers=...) or raise keep")
        # made with real values even where the model is built on the meta device (HF's loading):
        # they are not the model's weights, nothing loads them; they follow it where used (`follow`)
        with torch.device("cpu"):
            modules = AtpModules(layers, llm.config.hidden_size, self.config.hidden, fraction)
        if llm.norm.weight.device.type != "meta":
            modules.to(device=llm.norm.weight.device)
        if self.config.weights is not None:
            load_modules(modules, self.config.weights)
        return modules

    def query_weights(self, visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor,
                      prompt: torch.Tensor, memo: Optional[torch.Tensor] = None) -> torch.Tensor:
        return score_weights(visual, instruction, valid)

    def select(self, site: LlmSite) -> torch.Tensor:
        """Keep mask `[B, N]` over the current tokens (text always 1; float in (0, 1] with
        `site.soft`): zero-shot, the top fraction by S_r's percentile plus the grid score; trained,
        the thresholds the site's module predicts from the pooled visual and instruction states."""
        modules, visual, spatial = follow(site.trainable, site.hidden), site.candidates, site.spatial
        pct = percentile(combine(site.received, site.visual, site.instruction, site.valid), visual)
        if not bool(modules.trained) and not site.soft:  # zero-shot: the top f (as FastV ranks)
            return top_fraction(pct + spatial, visual, modules.fraction)
        pooled = lambda m: (site.hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        theta = modules.at(site.layer)(pooled(visual.to(site.hidden.dtype)),
                                       pooled(site.instruction.to(site.hidden.dtype)), pct)
        pct = pct.nan_to_num(0.0)
        if site.soft:
            tau = self.config.tau
            m = torch.maximum(torch.sigmoid(tau * (pct - theta[:, :1])), torch.sigmoid(tau * (spatial - theta[:, 1:])))
            return torch.where(visual, m, torch.ones_like(m))
        return ~visual | (pct > theta[:, :1]) | (spatial > theta[:, 1:])
