"""Apply a reduction plan to every tensor that follows the tokens.

A method decides once per layer which tokens survive and where the others go (a `Plan`); this
module applies that decision to x, the sizes and the source map, ToMe-style: indices computed
once, applied to many tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .state import TokenState
from .triton_kernels import matching as kernels


@dataclass
class Plan:
    """Which tokens survive a layer and where the removed ones go.

    Attributes:
        keep: `[B, K]` positions of the surviving tokens in output order; the protected prefix
            comes first, in order.
        src: `[B, R]` positions of tokens merged away, or None for pure pruning (every token not
            in `keep` or `src` is dropped).
        dst: `[B, R]` for each source, the *output* position (index into `keep`) of the token it
            merges into.
        csr: the sources grouped by destination and each output token's start in that list
            (`[B, R]`, `[B, K + 1]`), when the plan kernel wrote them; the merge kernel needs them
            and otherwise groups the sources itself.
        mode: "wavg" (size-weighted average, sizes add), "mean" (DiffRate's code: the plain
            mean of a destination and its sources; each source adds its size times `src_weight`)
            or "plus_mean" (VisionZip's contextual tokens: the destination plus the mean of its
            sources; sizes add).
        src_weight: `[B, R]` per-source size factors of the "mean" mode.
    """

    keep: torch.Tensor
    src: Optional[torch.Tensor] = None
    dst: Optional[torch.Tensor] = None
    csr: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    mode: str = "wavg"
    src_weight: Optional[torch.Tensor] = None

    @property
    def n_out(self) -> int:
        return self.keep.shape[1]


def merge_wavg(plan: Plan, x: torch.Tensor, size: Optional[torch.Tensor], log_scale: Optional[float] = None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Size-weighted merge: `x_dst' = (s_dst x_dst + sum s_src x_src) / (s_dst + sum s_src)`.

    `size=None` means all ones; pure pruning of all-ones sizes keeps them None (no attention
    bias needed later). With `log_scale`, also `log(size') * log_scale` (`[B, K]`, the size
    channel of proportional attention). Runs the fused Triton kernel on CUDA, its twin elsewhere.
    """
    if plan.src is None and size is None:
        return kernels.merge_wavg(x, None, plan.keep)[0], None, None
    return kernels.merge_wavg(x, size, plan.keep, plan.src, plan.dst, csr=plan.csr, log_scale=log_scale)


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`[B, K, C]` rows `index` (`[B, K]`) of `t` (`[B, N, C]`)."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def merge_mean(plan: Plan, x: torch.Tensor, size: Optional[torch.Tensor], log_scale: Optional[float] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """DiffRate's merge: `x_dst' = mean(x_dst, x_src...)`, `s_dst' = s_dst + sum w_src s_src`."""
    batch, _, channels = x.shape
    size = size if size is not None else x.new_ones(batch, x.shape[1], 1, dtype=torch.float32)
    out, out_size = gather_rows(x, plan.keep).float(), gather_rows(size, plan.keep)
    count = torch.ones_like(out_size)
    dst = plan.dst.unsqueeze(-1)
    out = out.scatter_add(1, dst.expand(-1, -1, channels), gather_rows(x, plan.src).float())
    count = count.scatter_add(1, dst, torch.ones_like(dst, dtype=count.dtype))
    weight = plan.src_weight.unsqueeze(-1).to(size.dtype)
    out_size = out_size.scatter_add(1, dst, weight * gather_rows(size, plan.src))
    log_size = out_size.squeeze(-1).log() * log_scale if log_scale is not None else None
    return (out / count).to(x.dtype), out_size, log_size


def merge_plus_mean(plan: Plan, x: torch.Tensor, size: Optional[torch.Tensor], log_scale: Optional[float] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """VisionZip's merge: `x_dst' = x_dst + mean(x_src)` over the sources assigned to it (`x_dst`
    where none is), sizes add."""
    batch, _, channels = x.shape
    size = size if size is not None else x.new_ones(batch, x.shape[1], 1, dtype=torch.float32)
    out, out_size = gather_rows(x, plan.keep).float(), gather_rows(size, plan.keep)
    dst = plan.dst.unsqueeze(-1)
    total = torch.zeros_like(out).scatter_add(1, dst.expand(-1, -1, channels), gather_rows(x, plan.src).float())
    count = torch.zeros_like(out_size).scatter_add(1, dst, torch.ones_like(dst, dtype=out_size.dtype))
    out = out + total / count.clamp(min=1)
    out_size = out_size.scatter_add(1, dst, gather_rows(size, plan.src))
    log_size = out_size.squeeze(-1).log() * log_scale if log_scale is not None else None
    return out.to(x.dtype), out_size, log_size


MERGES = {"mean": merge_mean, "plus_mean": merge_plus_mean}


def new_positions(plan: Plan, n_tokens: int) -> torch.Tensor:
    """`[B, N]` output position of every input token of the layer (-1 when dropped)."""
    batch = plan.keep.shape[0]
    pos = torch.full((batch, n_tokens), -1, dtype=torch.long, device=plan.keep.device)
    ar = torch.arange(plan.n_out, device=pos.device).expand(batch, -1)
    pos.scatter_(1, plan.keep, ar)
    if plan.src is not None:
        pos.scatter_(1, plan.src, plan.dst)
    return pos


def merge_source(plan: Plan, source: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Follow the compact source map (`[B, N0]` holder index) through the plan."""
    pos = new_positions(plan, n_tokens)
    moved = pos.gather(1, source.clamp(min=0))
    return torch.where(source < 0, source, moved)


def apply_plan(plan: Plan, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
    """Apply `plan` to x, sizes and source; returns the reduced x and the next state."""
    n_tokens = x.shape[1]
    merge = MERGES.get(plan.mode, merge_wavg)
    x, size, log_size = merge(plan, x, state.size, state.log_size_scale if state.prop_attn else None)
    source = state.source
    if source is not None:
        source = merge_source(plan, source, n_tokens)
    return x, state.replace(size=size, log_size=log_size, source=source)
