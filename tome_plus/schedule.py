"""Budgets -> per-layer token removal counts.

Every budget (`r`, `keep`, `flops`, `tokens`) becomes a list with the number of tokens each block removes,
fixed for a given input token count, so shapes are static per batch. Counts larger than a layer
can take are clamped with one warning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Protocol, Sequence, Tuple

from .warn import warn_caller

MaxRemove = Callable[[int, int, int], int]  # (layer, n_tokens, n_prefix) -> most removable
KeepRemoval = Callable[[int, float], int]  # (reducible tokens T, keep) -> tokens removed


@dataclass(frozen=True)
class VitCost:
    """Analytic FLOPs of a pre-norm ViT in which each block reduces between attention and MLP.

    FLOPs count a multiply-add as 2, as `torch.utils.flop_counter` does. The reduction step's own
    cost (matching) is left out: it is what the Triton kernels make small. With proportional
    attention's size channel (`prop_attn.py`), every block after the first merge computes q and k
    at the padded width `qk_dim` (heads x padded head dim): a few percent more FLOPs, counted here
    so that a `flops` target is what the forward really does.
    """

    dim: int
    attn_dim: int
    hidden: int
    depth: int
    embed_flops: float
    head_flops: float
    qk_dim: int = 0  # padded q/k width once the size channel is on; 0: never padded
    pad_after_merge: bool = False
    reduce_after_mlp: bool = False  # the MLP runs on the layer's input count (reduction site "block")

    def block(self, n_in: int, n_out: int, padded: bool = False) -> float:
        qk = self.qk_dim if padded and self.qk_dim else self.attn_dim
        qkv = 2 * n_in * self.dim * (2 * qk + self.attn_dim)
        attn = qkv + 2 * n_in * self.attn_dim * self.dim + 2 * n_in * n_in * (qk + self.attn_dim)
        mlp = 4 * (n_in if self.reduce_after_mlp else n_out) * self.dim * self.hidden
        return float(attn + mlp)

    def total(self, n_tokens: int, removals: Sequence[int]) -> float:
        flops, n, padded = self.embed_flops + self.head_flops, n_tokens, False
        for r in removals:
            flops += self.block(n, n - r, padded)
            padded = padded or (self.pad_after_merge and r > 0)
            n -= r
        return flops


@dataclass(frozen=True)
class VitCostModel:
    """FLOPs model of one pre-norm ViT-shaped encoder for the schedule solver: `n_tokens -> VitCost`
    (picklable; what a backend fills in from its model)."""

    dim: int
    attn_dim: int
    hidden: int
    depth: int
    n_prefix: int
    patch_flops: float  # embedding FLOPs per patch
    head_flops: float
    qk_dim: int = 0  # q/k width with the size channel (0: the channel never runs)
    reduce_after_mlp: bool = False  # the method reduces after the whole layer (site "block")

    def __call__(self, n_tokens: int) -> VitCost:
        return VitCost(dim=self.dim, attn_dim=self.attn_dim, hidden=self.hidden, depth=self.depth,
                       embed_flops=(n_tokens - self.n_prefix) * self.patch_flops, head_flops=self.head_flops,
                       qk_dim=self.qk_dim, pad_after_merge=self.qk_dim > 0,
                       reduce_after_mlp=self.reduce_after_mlp)


class Cost(Protocol):
    """What the solver needs of a backend's FLOPs model: the FLOPs of one forward."""

    def total(self, n_tokens: int, removals: Sequence[int]) -> float: ...


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


def paper_keep_removal(t: int, keep: float) -> int:
    """Remove `T - floor(T keep)` of the T reducible tokens (PiToMe's paper: keep floor(T keep))."""
    # the epsilon keeps e.g. 196 * 0.75 = 147.0 from flooring to 146 through float error
    return t - math.floor(t * keep + 1e-9)


def _keep_request(keeps: Sequence[float], n_prefix: int, removal: KeepRemoval) -> Callable[[int, int], int]:
    return lambda layer, n: removal(n - n_prefix, keeps[layer])


def solve(budget: Tuple[str, object], unit: str, depth: int, n_tokens: int, n_prefix: int,
          max_remove: MaxRemove, cost: Cost, warn: bool = True,
          active: Callable[[int], bool] = lambda layer: True,
          keep_removal: KeepRemoval = paper_keep_removal, strict: bool = True) -> List[int]:
    """Per-layer removal counts for one budget.

    Args:
        budget: ("r", value), ("keep", value), ("flops", fraction) or ("tokens", reducible tokens
            left after the last layer: `_solve_tokens`).
        unit: the method's schedule family for `flops` targets: "r" or "keep".
        depth: number of blocks.
        n_tokens: tokens entering the first block (prefix included).
        n_prefix: protected prefix tokens.
        max_remove: the method's per-layer limit `(layer, n_tokens, n_prefix) -> int`.
        cost: the backend's FLOPs model.
        active: which layers the method reduces in at all (e.g. Zero-TPrune's `layers`).
        keep_removal: how a `keep` fraction of T reducible tokens becomes a count.
        strict: an unreachable `flops` or `tokens` target raises ValueError; otherwise it warns
            and returns the schedule that comes closest.
    """
    kind, value = budget
    if kind == "tokens":
        return _solve_tokens(int(value), depth, n_tokens, n_prefix, max_remove, active, strict)
    if kind == "flops":
        return _solve_flops(float(value), unit, depth, n_tokens, n_prefix, max_remove, cost, active,
                            keep_removal, strict)
    if kind == "r":
        wanted = r_schedule(value, depth)
        request = lambda layer, n: wanted[layer]
    elif kind == "keep":
        request = _keep_request(keep_schedule(value, depth), n_prefix, keep_removal)
    else:
        raise ValueError(f"unknown budget {kind!r}")
    counts, clamped = _run(request, depth, n_tokens, n_prefix, max_remove, active)
    if clamped and warn:
        detail = ", ".join(f"layer {l}: {a} -> {g}" for l, a, g in clamped)
        warn_caller(f"budget {kind}={value!r} is more than {len(clamped)} layer(s) can take with "
                    f"{n_tokens} input tokens; clamped ({detail})")
    return counts


def _solve_flops(target: float, unit: str, depth: int, n_tokens: int, n_prefix: int,
                 max_remove: MaxRemove, cost: Cost, active: Callable[[int], bool],
                 keep_removal: KeepRemoval, strict: bool) -> List[int]:
    base = cost.total(n_tokens, [0] * depth)

    def ratio(counts: Sequence[int]) -> float:
        return cost.total(n_tokens, counts) / base

    def unreachable(most: List[int]) -> List[int]:
        _unreachable(f"flops={target} is below what this method reaches on this model and input "
                     f"({n_tokens} tokens: {ratio(most):.3f} of the unpatched FLOPs)", strict)
        return most

    if unit == "r":
        # t tokens over the active layers: floor(t / n) in each, one more in the first t % n.
        # FLOPs fall with t (past t = 1, where the size channel's padding may add a little), so
        # bisection with the `lo == 0` invariant below finds the closest schedule.
        layers = [layer for layer in range(depth) if active(layer)] or list(range(depth))

        def counts_for(t: int) -> List[int]:
            wanted = _even_split(t, depth, layers)
            return _run(lambda layer, n: wanted[layer], depth, n_tokens, n_prefix, max_remove, active)[0]

        hi = len(layers) * max(max(max_remove(layer, n_tokens, n_prefix) for layer in layers), 0)
        lo = 0
        if ratio(counts_for(hi)) > target + 1e-9:
            return unreachable(counts_for(hi))
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
            request = _keep_request([keep] * depth, n_prefix, keep_removal)
            return _run(request, depth, n_tokens, n_prefix, max_remove, active)[0]

        lo, hi = 0.0, 1.0  # ratio falls as keep falls
        if ratio(counts_for_keep(lo)) > target + 1e-9:
            return unreachable(counts_for_keep(lo))
        for _ in range(50):
            mid = (lo + hi) / 2
            if ratio(counts_for_keep(mid)) > target:
                hi = mid
            else:
                lo = mid
        best = min((counts_for_keep(lo), counts_for_keep(hi)), key=lambda c: abs(ratio(c) - target))
        return best
    raise ValueError(f"unknown budget unit {unit!r}")


def _solve_tokens(target: int, depth: int, n_tokens: int, n_prefix: int, max_remove: MaxRemove,
                  active: Callable[[int], bool], strict: bool) -> List[int]:
    """Counts that leave exactly `target` reducible tokens after the last layer.

    The `T - target` removals are spread evenly over the active layers (the earlier ones take the
    remainder, one each); a layer that cannot take its share (`max_remove`) passes the excess on to
    the next active layer. What is left over at the end, or a target above T, is unreachable.
    """
    reducible = n_tokens - n_prefix
    layers = [layer for layer in range(depth) if active(layer)]
    total = max(reducible - target, 0)
    wanted = _even_split(total, depth, layers)
    counts, n, carry = [], n_tokens, 0
    for layer in range(depth):
        asked = wanted[layer] + carry if active(layer) else 0
        given = max(0, min(asked, max_remove(layer, n, n_prefix))) if asked else 0
        carry = asked - given if active(layer) else carry
        counts.append(given)
        n -= given
    left = n - n_prefix
    if left != target:
        _unreachable(f"tokens={target} is not reachable with {n_tokens} input tokens ({reducible} reducible): "
                     f"this method's layers leave {left} at the closest", strict)
    return counts


def _even_split(total: int, depth: int, layers: Sequence[int]) -> List[int]:
    """`total` removals over `layers` (of `depth`): floor(total / n) each, one more in the first
    total % n; 0 in every other layer."""
    wanted = [0] * depth
    if layers:
        q, m = divmod(total, len(layers))
        for i, layer in enumerate(layers):
            wanted[layer] = q + (1 if i < m else 0)
    return wanted


def _unreachable(message: str, strict: bool) -> None:
    """An unreachable target: an error at `patch` (strict), one warning inside a forward (the
    caller then uses the closest schedule)."""
    if strict:
        raise ValueError(message)
    warn_caller(message + "; using that schedule")
