"""VisionZip: dominant tokens by attention, the rest merged into a few contextual tokens.

Yang, Chen, Tian, Wang, Chen, Zhao, Jia, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025 (arXiv:2412.04467; code: dvlab-research/VisionZip). Implements
(docs/methods.md, VisionZip) its selection once, on the output of the vision tower's feature layer
(LLaVA's layer -2), with that layer's attention:

- dominant tokens: the `dominant` patches that receive the most attention from the class token,
  summed over heads (paper Sec. 3.2: `s_i = sum_h softmax(q_cls k^T / sqrt(d))_i`); in the authors'
  code the class token itself is one of the `dominant` tokens the LLM receives (`cls_token=True`);
- contextual tokens: the remaining tokens' keys of that layer (averaged over heads, cosine
  normalised); `contextual` of them, taken at a uniform stride (`step = max(1, M // contextual)`,
  the first `contextual` of `0, step, 2 step, ...` in index order), are targets; every other
  remaining token goes to its most similar target (cosine of keys; the first on ties) and each
  target becomes `target + mean(tokens assigned to it)` (the target itself plus the mean of the
  others, as their code sums; a target nobody joins stays as it is);
- the LLM receives the dominant tokens in index order, then the contextual ones in target order.

Budgets: `tokens=T` is split as the authors' settings (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of
192: contextual = round(5 T / 32)) unless `contextual=` is given; `keep=` and `r=` count the same
T. Where a tower has no class token, or at `site="features"` (no tower attention there), the
dominance is the attention each token receives from the image's tokens, summed over heads and
averaged over queries (the paper's rule for towers without [CLS]); at the features site that is the
first decoder layer's attention among the image's tokens and the keys are the features.

Differences from their code, documented: similarities and the merge in float32 (their code in the
tower's dtype); `topk` ties (never met with real attention) as torch breaks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, FrozenSet, Optional

import torch
import torch.nn.functional as F

from ..merging import Plan
from ..state import TokenState
from .base import ReductionConfig, Reducer, is_int, register


@dataclass
class VisionZipConfig(ReductionConfig):
    """VisionZip.

    Attributes:
        contextual: contextual (merged) tokens per image; None: the authors' split of the budget,
            round(5 T / 32) of T tokens (10 of 64, 20 of 128, 30 of 192).
        cls_token: where the tower has a class token, it is one of the dominant tokens the LLM
            receives (the authors' code: 64 = [CLS] + 53 patches + 10 contextual); False: the
            dominant tokens are patches only (the LLM gets no class token, as LLaVA's default
            feature selection drops it).
    """

    contextual: Optional[int] = None
    cls_token: bool = True

    default_budget: ClassVar[Dict[str, object]] = {"tokens": 64}
    default_prop_attn: ClassVar[bool] = False  # the feature layer is the last: nothing attends after

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contextual is not None and (not is_int(self.contextual) or self.contextual < 0):
            raise ValueError(f"contextual must be an int >= 0 (merged tokens per image), got {self.contextual!r}")
        if not isinstance(self.cls_token, bool):
            raise ValueError(f"cls_token must be True or False, got {self.cls_token!r}")
        if isinstance(self.keep, list) or isinstance(self.r, (list, tuple)):
            raise ValueError("VisionZip selects once, at the feature layer: give one number, not a per-layer list")


def split(n_keep: int, contextual: Optional[int]) -> int:
    """Contextual tokens among `n_keep`: the given count or the authors' 10 / 64, at most n_keep - 1."""
    c = int(round(5 * n_keep / 32)) if contextual is None else contextual
    return max(min(c, n_keep - 1), 0)


@register
class VisionZip(Reducer):
    name = "visionzip"
    config_class = VisionZipConfig
    # at the features site: the attention among the image's tokens (`llm.features.reduce_sets`);
    # in a tower with a class token: its row alone (`needs_at`)
    needs = frozenset({"attn", "keys", "x"})
    budget_unit = "r"
    last_layer_only = True
    for_vlm_only = True

    @property
    def site(self) -> str:
        return "block"  # the selection reads the feature layer's output, after its MLP

    def needs_at(self, layer: int) -> FrozenSet[str]:
        return frozenset({"cls_attn", "keys", "x"})

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        return max(n_tokens - n_prefix - 1, 0)  # one selection, down to one token

    def keep_removal(self, t: int, keep: float) -> int:
        return t - max(int(round(keep * t)), 1)

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        x = signals["x"]
        batch, n, _ = x.shape
        prefix = state.n_prefix
        n_keep = n - prefix - n_remove
        contextual = split(n_keep, self.config.contextual)
        cls = int(state.has_cls and self.config.cls_token)  # the class token sent as a dominant one
        dominant = n_keep - contextual - cls  # patches picked by attention
        if "cls_attn" in signals:
            score = signals["cls_attn"].float().sum(dim=1)[:, prefix:]
        else:  # no class token: the attention each token receives, over heads and queries
            attn = signals["attn"]
            attn = attn.full() if hasattr(attn, "full") else attn  # the features site's graph is formed as read
            score = attn.float().sum(dim=1).mean(dim=1)[:, prefix:]
        device = x.device
        top = score.topk(dominant, dim=1).indices.sort(dim=1).values  # in index order, no host sync
        picked = torch.zeros(batch, n - prefix, dtype=torch.bool, device=device).scatter_(1, top, True)
        # the others in index order: unpicked first, a stable sort keeps their order
        others = picked.to(torch.int8).argsort(dim=1, stable=True)[:, :n - prefix - dominant]
        dominant_index = top + prefix
        head = torch.arange(prefix, device=device).expand(batch, prefix)
        cls_index = torch.zeros(batch, cls, dtype=torch.long, device=device)
        if contextual == 0:
            return Plan(keep=torch.cat([head, cls_index, dominant_index], dim=1))
        m = others.shape[1]
        step = max(1, m // contextual)
        is_target = torch.zeros(m, dtype=torch.bool, device=device)
        is_target[torch.arange(0, m, step, device=device)[:contextual]] = True
        targets, rest = others[:, is_target] + prefix, others[:, ~is_target] + prefix
        keys = F.normalize(signals["keys"].float(), dim=-1)
        gather = lambda idx: keys.gather(1, idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
        assign = (gather(rest) @ gather(targets).transpose(1, 2)).argmax(dim=2)  # [B, R]: first max on ties
        keep = torch.cat([head, cls_index, dominant_index, targets], dim=1)
        return Plan(keep=keep, src=rest, dst=assign + prefix + cls + dominant, mode="plus_mean")
