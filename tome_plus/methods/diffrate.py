"""DiffRate: differentiable compression rates, applied with a searched per-layer schedule.

Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023 (arXiv:2305.17997); docs/methods.md, DiffRate. This file is the inference side: per block,
between attention and MLP,
- importance = the class token's attention row averaged over heads (the `cls_attn` signal: the
  rest of the attention stays fused); tokens sorted by it, prefix tokens first;
- prune: keep the first k_p (the layer's `prune_kept_num`);
- merge: every token in [k_m, k_p) goes into its most cosine-similar token in [p, k_m) on the
  hidden states (a prefix token is never a destination); output length k_m (`merge_kept_num`).
As the authors' inference code does (`merge="mean"`, the default), a destination becomes the
plain mean of itself and its sources, and its size grows by each source's size times its
similarity to the destination (their proportional-attention tweak for off-the-shelf models);
`merge="size_weighted"` is the variant with docs/methods.md's size-weighted merge and plain sizes.

Schedules: the published searched counts ship with the package (`diffrate_schedules.json`, keyed
by timm model name and GFLOPs); `schedule=` takes a searched one (a path or a dict with the same
keys). After block l the model keeps min(prune[l], merge[l]) tokens, as a running minimum where a
published list rises. The search (learnable rates) is `tome_plus.diffrate_search`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple, Union

import torch

from ..merging import Plan
from ..state import TokenState
from .base import ReductionConfig, Reducer, is_real, register

SCHEDULES = os.path.join(os.path.dirname(__file__), "diffrate_schedules.json")
SEARCH_HINT = "search one with `tome-plus diffrate-search --model NAME --data DIR --flops F --out PATH` and pass schedule=PATH"
MERGES = ("mean", "size_weighted")


def presets() -> Dict[str, Dict[str, Dict[str, List[int]]]]:
    """The published schedules: model name -> GFLOPs (as written) -> prune/merge kept counts."""
    with open(SCHEDULES, encoding="utf-8") as f:
        return json.load(f)["schedules"]


@dataclass
class DiffRateConfig(ReductionConfig):
    """DiffRate. Give one of `gflops` (a published schedule for this model), `schedule` (a
    searched one: a JSON path or a dict with `prune_kept_num` / `merge_kept_num`) or `flops` (a
    fraction of the unpatched FLOPs: the published schedule closest to it, within 3%).

    Attributes:
        gflops: the GFLOPs key of a published schedule (e.g. 2.9 for DeiT-S; the authors' "GFLOPs"
            count multiply-accumulates, i.e. GMACs).
        schedule: per-layer kept counts (class token included).
        merge: "mean" (the authors' code) or "size_weighted" (the size-weighted merge, docs/methods.md).
        kept: set at `patch`, not an option: the tokens after each block (class token included)
            of the schedule in use, so `tome_plus.inspect(model).config` shows it (`r` is None:
            DiffRate has no per-layer budget of its own).
    """

    gflops: Optional[float] = None
    schedule: Optional[Union[str, dict]] = None
    merge: str = "mean"
    kept: Optional[List[int]] = field(default=None, init=False)

    default_budget: ClassVar[Dict[str, object]] = {}

    @property
    def budget(self) -> Tuple[str, object]:
        """What sets the counts: ("gflops", value), ("schedule", the schedule) or ("flops", value)."""
        for name in ("gflops", "schedule", "flops"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        raise AssertionError("unreachable: __post_init__ checks that one is given")

    def __post_init__(self) -> None:
        if self.r is not None or self.keep is not None or self.tokens is not None:
            raise ValueError("DiffRate takes gflops=, schedule= or flops=, not r or keep (nor tokens: its "
                             "schedule is its own)")
        given = [n for n in ("gflops", "schedule", "flops") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"DiffRate needs exactly one of gflops=, schedule= or flops= (got {given or 'none'})")
        flops, self.flops = self.flops, None
        self.r = 0  # the base class checks a budget; the schedule below is what counts
        super().__post_init__()
        self.r, self.flops = None, flops
        if self.flops is not None and (not is_real(self.flops) or not 0 < self.flops <= 1):
            raise ValueError(f"flops must lie in (0, 1], got {self.flops!r}")
        if self.gflops is not None and not is_real(self.gflops):
            raise ValueError(f"gflops must be a number, got {self.gflops!r}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if isinstance(self.schedule, str):
            with open(self.schedule, encoding="utf-8") as f:
                self.schedule = json.load(f)
        if self.schedule is not None:
            check_schedule(self.schedule)


def check_schedule(schedule: dict) -> None:
    for key in ("prune_kept_num", "merge_kept_num"):
        values = schedule.get(key)
        if not isinstance(values, list) or not values or not all(isinstance(v, int) and v > 0 for v in values):
            raise ValueError(f"a DiffRate schedule needs {key}: a list of positive ints per block, got {values!r}")
    if len(schedule["prune_kept_num"]) != len(schedule["merge_kept_num"]):
        raise ValueError("prune_kept_num and merge_kept_num must have one count per block each")


def kept_counts(schedule: dict, n_tokens: int) -> List[Tuple[int, int]]:
    """(k_p, k_m) per block for `n_tokens` input tokens: running minima, merge never above prune."""
    out, n = [], n_tokens
    for prune, merge in zip(schedule["prune_kept_num"], schedule["merge_kept_num"]):
        k_p = min(prune, n)
        k_m = min(merge, k_p)
        out.append((k_p, k_m))
        n = k_m
    return out


def n_tokens_of(schedule: dict) -> int:
    """The input token count a schedule is for: written by the search, else its block 0's count
    (every published schedule starts with the full count)."""
    return int(schedule.get("n_tokens", schedule["prune_kept_num"][0]))


def schedule_removals(schedule: dict, n_tokens: int) -> List[int]:
    counts, n = [], n_tokens
    for _, k_m in kept_counts(schedule, n_tokens):
        counts.append(n - k_m)
        n = k_m
    return counts


@register
class DiffRate(Reducer):
    name = "diffrate"
    config_class = DiffRateConfig
    needs = frozenset({"cls_attn", "x"})
    vlm_sites = ("tower",)  # its schedules are per tower block: nothing to run once on the features

    def __init__(self, config: DiffRateConfig) -> None:
        super().__init__(config)
        self.schedule: Optional[dict] = config.schedule

    def for_model(self, name: Optional[str], gflops_of) -> None:
        """Pick the published schedule for `name` (timm's name, with its tag: `vit_base_patch16_224.mae`);
        `gflops_of(removals)`: the model's GFLOPs with those per-layer removals (None: unpatched)."""
        if self.schedule is None:
            self.schedule = self._preset(name, gflops_of)
        counts = kept_counts(self.schedule, n_tokens_of(self.schedule))
        self.config.kept = [k_m for _, k_m in counts]

    def _preset(self, name: Optional[str], gflops_of) -> dict:
        table = presets()
        known = "; ".join(f"{m}: {', '.join(v)}" for m, v in table.items())
        if name is None:
            raise ValueError(f"DiffRate's published schedules are looked up by the model's timm name ({', '.join(table)}) "
                             f"and this model has none; pass schedule= (a dict with prune_kept_num/merge_kept_num, or "
                             f"the JSON `tome-plus diffrate-search` writes)")
        found = table.get(name) or table.get(name.split(".")[0])
        if found is None:
            raise ValueError(f"no published DiffRate schedule for {name!r} (presets, GFLOPs: {known}); {SEARCH_HINT}")
        if self.config.gflops is not None:
            key = next((k for k in found if math.isclose(float(k), self.config.gflops, abs_tol=1e-6)), None)
            if key is None:
                raise ValueError(f"no published DiffRate schedule for {name} at {self.config.gflops} GFLOPs "
                                 f"(published: {', '.join(found)}); {SEARCH_HINT}")
        else:  # by what each schedule really costs on this model (a preset's name is only its target)
            base = gflops_of(None)
            cost = {k: gflops_of(schedule_removals(v, n_tokens_of(v))) / base for k, v in found.items()}
            key = min(found, key=lambda k: abs(cost[k] - self.config.flops))
            if abs(cost[key] - self.config.flops) > 0.03:
                costs = ", ".join(f"{k} ({cost[k]:.3f})" for k in found)
                raise ValueError(f"flops={self.config.flops}: the published schedules for {name} cost {costs} of the "
                                 f"unpatched FLOPs; {SEARCH_HINT}")
        return found[key]

    def check(self, depth: int) -> None:
        if self.schedule is not None and len(self.schedule["prune_kept_num"]) != depth:
            raise ValueError(f"the DiffRate schedule has {len(self.schedule['prune_kept_num'])} blocks, the model "
                             f"{depth}")

    def removals(self, n_tokens: int, n_prefix: int) -> List[int]:
        """Tokens removed by each block: the schedule's counts, exactly (for the token count it
        was searched at: any other input size is an error, not a silently different schedule)."""
        expected = n_tokens_of(self.schedule)
        if n_tokens != expected:
            raise ValueError(f"the DiffRate schedule is for {expected} input tokens (the image size it was searched "
                             f"at), got {n_tokens}")
        counts = schedule_removals(self.schedule, n_tokens)
        kept = n_tokens - sum(counts)
        if kept < n_prefix + 1:
            raise ValueError(f"the schedule keeps {kept} tokens, fewer than the {n_prefix} protected + 1")
        return counts

    def max_remove(self, layer: int, n_tokens: int, n_prefix: int) -> int:
        return max(n_tokens - n_prefix - 1, 0)

    def plan(self, signals: Dict[str, torch.Tensor], state: TokenState, n_remove: int) -> Plan:
        cls_attn, x, p = signals["cls_attn"], signals["x"], state.n_prefix
        k_p, k_m = kept_counts(self.schedule, state.n_input)[state.layer]
        # kept counts relative to the tokens present (a head may have added some: CLCA's cached
        # tokens): `n_remove` go, `k_p - k_m` of them by merging
        k_m, n_merge = x.shape[1] - n_remove, k_p - k_m
        k_p = k_m + n_merge
        importance = cls_attn.float().mean(dim=1)
        # prefix tokens first, in order; then by importance, ties to the lower position
        importance[:, :p] = math.inf
        order = importance.argsort(dim=1, descending=True, stable=True)
        keep, src = order[:, :k_m], order[:, k_m:k_p]
        if src.shape[1] == 0:
            return Plan(keep=keep)
        with torch.no_grad():
            # the rows are gathered in x's dtype and compared in float32 (a half model must pick
            # the destinations fp32 picks)
            def take(idx: torch.Tensor) -> torch.Tensor:
                rows = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).float()
                return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            sim = take(src) @ take(keep[:, p:]).transpose(1, 2)  # sources x possible destinations
            best, dst = sim.max(dim=-1)
        mode = "mean" if self.config.merge == "mean" else "wavg"
        # a source adds its size times its similarity; an opposed source (negative cosine) adds nothing
        # rather than a negative size (whose log would be nan)
        return Plan(keep=keep, src=src, dst=dst + p, mode=mode, src_weight=best.clamp(min=0) if mode == "mean" else None)
