"""Proportional attention that keeps SDPA's fast kernels: one extra q/k channel instead of a mask.

ToMe's proportional attention adds `log s_j` to the logit of every key j. Passed to
`F.scaled_dot_product_attention` as an additive `[B, 1, 1, N]` mask it leaves the fast kernels
(3x the time of the unmasked call on an H100, `shared/perf`). The same logits come from one extra
channel per head:

    q' = [q, 1, 0...],  k' = [k, log(s) / scale, 0...],  v unchanged,
    scale q'.k' = scale q.k + log s,

with the q/k head dim padded to a multiple of 8 (what the fast kernels want). The padded q' and k'
are written by the qkv GEMM itself: its weight and bias are padded once (zero rows; bias 1 on q's
first padding row), so the only extra work per layer is writing `log(s) / scale` into k's first
padding channel, in place. v keeps its width, so the attention output is unchanged in shape.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

SCRATCH = "_tome_plus_scratch"  # where a patched module caches its padded weights: never pickled


def padded_head_dim(head_dim: int) -> int:
    """Head dim with room for the size channel, rounded up to a multiple of 8."""
    return (head_dim + 1 + 7) // 8 * 8


def pad_qkv(weight: torch.Tensor, bias: Optional[torch.Tensor], heads: int,
            head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """qkv projection `[3 H D, C]` -> `[2 H Dp + H D, C]`: q and k heads padded to Dp, v as is.

    Built from the parameters with differentiable ops, so gradients reach them when training.
    """
    dp = padded_head_dim(head_dim)
    channels = weight.shape[1]
    q, k, v = weight.reshape(3, heads, head_dim, channels).unbind(0)
    b = bias if bias is not None else weight.new_zeros(3 * heads * head_dim)
    bq, bk, bv = b.reshape(3, heads, head_dim).unbind(0)
    pad = (0, 0, 0, dp - head_dim)  # zero rows after each head's D rows
    w_out = torch.cat([F.pad(q, pad).reshape(-1, channels), F.pad(k, pad).reshape(-1, channels),
                       v.reshape(-1, channels)])
    ones = torch.zeros(heads, dp - head_dim, dtype=b.dtype, device=b.device)
    ones[:, 0] = 1.0  # q's first padding channel is the constant 1
    b_out = torch.cat([torch.cat([bq, ones], 1).reshape(-1), F.pad(bk, (0, dp - head_dim)).reshape(-1),
                       bv.reshape(-1)])
    return w_out, b_out


def split_padded(qkv: torch.Tensor, heads: int, head_dim: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q' `[B, H, N, Dp]`, k' `[B, H, N, Dp]`, v `[B, H, N, D]` of the padded GEMM output."""
    batch, n, _ = qkv.shape
    dp = padded_head_dim(head_dim)
    q = qkv[..., :heads * dp].view(batch, n, heads, dp).transpose(1, 2)
    k = qkv[..., heads * dp:2 * heads * dp].view(batch, n, heads, dp).transpose(1, 2)
    v = qkv[..., 2 * heads * dp:].view(batch, n, heads, head_dim).transpose(1, 2)
    return q, k, v


def write_size_channel(k_padded: torch.Tensor, head_dim: int, log_size_scaled: torch.Tensor) -> None:
    """k'[..., D] = log(s) / scale for every head, in place (`log_size_scaled`: `[B, N]`)."""
    k_padded[..., head_dim].copy_(log_size_scaled.unsqueeze(1).to(k_padded.dtype))


def cached_padded_qkv(owner: nn.Module, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                      heads: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The size-channel qkv weight and bias built from `weights` (one fused `[3 H D, C]` qkv, or
    the q, k, v projections in that order, fused here into one GEMM), cached on `owner`.

    Rebuilt (differentiably) whenever gradients may flow, a compiler traces or the weights are
    inference tensors (no version counter); otherwise cached and rebuilt when a parameter's version
    (in-place updates, `load_state_dict`), storage (`.to()`), dtype or the inference mode changes.
    Updates that bypass the version counter (fused optimizer steps, writes through `.data`, FSDP
    refills) are covered by `train()`/`eval()` dropping the cache, and by `tome_plus.refresh(model)`.
    """
    params = tuple(weights) + tuple(b for b in biases if b is not None)

    def build() -> Tuple[torch.Tensor, torch.Tensor]:
        weight = weights[0] if len(weights) == 1 else torch.cat(list(weights))
        if all(b is None for b in biases):
            bias = None
        elif len(biases) == 1:
            bias = biases[0]
        else:  # a missing projection bias is a zero bias
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        return pad_qkv(weight, bias, heads, head_dim)

    if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.jit.is_tracing() \
            or torch.compiler.is_compiling() or any(p.is_inference() for p in params):
        return build()
    key = (torch.is_inference_mode_enabled(),) + tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
    cached = owner.__dict__.get(SCRATCH)
    if cached is None or cached[0] != key:
        cached = (key, *build())
        owner.__dict__[SCRATCH] = cached
    return cached[1], cached[2]
