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

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


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
