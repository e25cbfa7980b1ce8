"""Budgets -> per-layer token removal counts.

Every budget (`r`, `keep`, `flops`) becomes a list with the number of tokens each block removes,
fixed for a given input token count, so shapes are static per batch. Counts larger than a layer
can take are clamped with one warning.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

MaxRemove = Callable[[int, int, int], int]  # (layer, n_tokens, n_prefix) -> most removable


@dataclass(frozen=True)
class VitCost:
    """Analytic FLOPs of a pre-norm ViT in which each block reduces between attention and MLP.

    FLOPs count a multiply-add as 2, as `torch.utils.flop_counter` does. The reduction step's own
    cost (matching) is left out: it is what the Triton kernels make small.
    """

    dim: int
    attn_dim: int
    hidden: int
    depth: int
    embed_flops: float
    head_flops: float

    def block(self, n_in: int, n_out: int) -> float:
        attn = 2 * n_in * self.dim * self.attn_dim * 4 + 4 * n_in * n_in * self.attn_dim
        mlp = 4 * n_out * self.dim * self.hidden
        return float(attn + mlp)

    def total(self, n_tokens: int, removals: Sequence[int]) -> float:
        flops, n = self.embed_flops + self.head_flops, n_tokens
        for r in removals:
            flops += self.block(n, n - r)
            n -= r
        return flops


def r_schedule(r, depth: int) -> List[int]:
    """ToMe's schedules: constant int, per-layer list (padded with zeros) or `(r, inflect)`."""
    if isinstance(r, tuple):
        # ToMe's schedule: the first layer's count is truncated, the last mirrors it around r,
        # and the layers between are truncated points of the straight line
        r0, inflect = r
        first = int(r0 * (1.0 - inflect))
        last = 2 * r0 - first
        step = (last - first) / max(depth - 1, 1)
        return [int(first + step * i) for i in range(depth)]
    if isinstance(r, list):
        if len(r) > depth:
            raise ValueError(f"r lists {len(r)} layers but the model has {depth}")
        return list(r) + [0] * (depth - len(r))
    return [int(r)] * depth


def keep_schedule(keep, depth: int) -> List[float]:
    if isinstance(keep, (list, tuple)):
        if len(keep) > depth:
            raise ValueError(f"keep lists {len(keep)} layers but the model has {depth}")
        return [float(k) for k in keep] + [1.0] * (depth - len(keep))
    return [float(keep)] * depth


def _run(request: Callable[[int, int], int], depth: int, n_tokens: int, n_prefix: int,
         max_remove: MaxRemove, active: Callable[[int], bool]) -> Tuple[List[int], List[Tuple[int, int, int]]]:
    """Walk the layers; returns counts and the clamped layers as (layer, asked, given).

    Layers the method leaves alone by configuration (`active` false) ask for nothing, so they are
    not reported as clamped.
    """
    out, clamped, n = [], [], n_tokens
    for layer in range(depth):
        asked = request(layer, n) if active(layer) else 0
        given = max(0, min(asked, max_remove(layer, n, n_prefix)))
        if given < asked:
            clamped.append((layer, asked, given))
        out.append(given)
        n -= given
    return out, clamped


def _keep_request(keeps: Sequence[float], n_prefix: int) -> Callable[[int, int], int]:
    """Remove `T - floor(T keep)` of the T reducible tokens (PiToMe's k)."""
    # the epsilon keeps e.g. 196 * 0.75 = 147.0 from flooring to 146 through float error
    return lambda layer, n: (n - n_prefix) - math.floor((n - n_prefix) * keeps[layer] + 1e-9)


def solve(budget: Tuple[str, object], unit: str, depth: int, n_tokens: int, n_prefix: int,
          max_remove: MaxRemove, cost: VitCost, warn: bool = True,
          active: Callable[[int], bool] = lambda layer: True) -> List[int]:
    """Per-layer removal counts for one budget.

    Args:
        budget: ("r", value), ("keep", value) or ("flops", fraction).
        unit: the method's schedule family for `flops` targets: "r" or "keep".
        depth: number of blocks.
        n_tokens: tokens entering the first block (prefix included).
        n_prefix: protected prefix tokens.
        max_remove: the method's per-layer limit `(layer, n_tokens, n_prefix) -> int`.
        cost: the backend's FLOPs model.
        active: which layers the method reduces in at all (e.g. Zero-TPrune's `layers`).
    """
    kind, value = budget
    if kind == "flops":
        return _solve_flops(float(value), unit, depth, n_tokens, n_prefix, max_remove, cost, active)
    if kind == "r":
        wanted = r_schedule(value, depth)
        request = lambda layer, n: wanted[layer]
    elif kind == "keep":
        request = _keep_request(keep_schedule(value, depth), n_prefix)
    else:
        raise ValueError(f"unknown budget {kind!r}")
    counts, clamped = _run(request, depth, n_tokens, n_prefix, max_remove, active)
    if clamped and warn:
        detail = ", ".join(f"layer {l}: {a} -> {g}" for l, a, g in clamped)
        warnings.warn(f"budget {kind}={value!r} is more than {len(clamped)} layer(s) can take with "
                      f"{n_tokens} input tokens; clamped ({detail})", stacklevel=4)
    return counts


def _solve_flops(target: float, unit: str, depth: int, n_tokens: int, n_prefix: int,
                 max_remove: MaxRemove, cost: VitCost, active: Callable[[int], bool]) -> List[int]:
    base = cost.total(n_tokens, [0] * depth)

    def ratio(counts: Sequence[int]) -> float:
        return cost.total(n_tokens, counts) / base

    if unit == "r":
        # t tokens over the active layers: floor(t / n) in each, one more in the first t % n.
        # FLOPs fall monotonically in t, which makes bisection exact.
        layers = [layer for layer in range(depth) if active(layer)] or list(range(depth))

        def counts_for(t: int) -> List[int]:
            q, m = divmod(t, len(layers))
            wanted = [0] * depth
            for i, layer in enumerate(layers):
                wanted[layer] = q + (1 if i < m else 0)
            return _run(lambda layer, n: wanted[layer], depth, n_tokens, n_prefix, max_remove, active)[0]

        hi = len(layers) * max(max(max_remove(layer, n_tokens, n_prefix) for layer in layers), 0)
        lo = 0
        if ratio(counts_for(hi)) > target + 1e-9:
            raise ValueError(f"flops={target} is below what this method reaches on this model and "
                             f"input ({ratio(counts_for(hi)):.3f} of the unpatched FLOPs)")
        while hi - lo > 1:  # invariant: ratio(lo) > target >= ratio(hi), or lo == 0
            mid = (lo + hi) // 2
            if ratio(counts_for(mid)) > target:
                lo = mid
            else:
                hi = mid
        best = min((lo, hi), key=lambda t: abs(ratio(counts_for(t)) - target))
        return counts_for(best)

    if unit == "keep":
        def counts_for_keep(keep: float) -> List[int]:
            request = _keep_request([keep] * depth, n_prefix)
            return _run(request, depth, n_tokens, n_prefix, max_remove, active)[0]

        lo, hi = 0.0, 1.0  # ratio falls as keep falls
        if ratio(counts_for_keep(lo)) > target + 1e-9:
            raise ValueError(f"flops={target} is below what this method reaches on this model and "
                             f"input ({ratio(counts_for_keep(lo)):.3f} of the unpatched FLOPs)")
        for _ in range(50):
            mid = (lo + hi) / 2
            if ratio(counts_for_keep(mid)) > target:
                hi = mid
            else:
                lo = mid
        best = min((counts_for_keep(lo), counts_for_keep(hi)), key=lambda c: abs(ratio(c) - target))
        return best
    raise ValueError(f"unknown budget unit {unit!r}")
