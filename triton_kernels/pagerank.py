"""Weighted PageRank over attention graphs (Zero-TPrune, METHODS.md section 3).

`weighted_pagerank(attn, iters, alive=None, init="cls", n_cls=1)` runs, for every (batch, head),
`s_t = A'^T s_{t-1}` where A' is the attention restricted to surviving tokens (rows renormalised
over surviving keys), and returns the final scores and each head's variance of `N s` (the
scale-free statistic of the variance head filter).

The Triton kernel runs one program per (batch, head) through every iteration: the renormalised
tile is kept on chip when the padded N is at most ONCHIP_MAX_BLOCK, otherwise A is streamed from
global memory in row blocks each iteration.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import check_launch, use_triton

# Largest padded N whose whole attention tile stays on chip for all iterations; above it the
# kernel streams row blocks of A from global memory every iteration.
ONCHIP_MAX_BLOCK = 256
# Elements per streamed [BLOCK_R, BLOCK_N] row block (bounds registers per program).
STREAM_BLOCK_ELEMS = 16384


def initial_scores(alive: torch.Tensor, init: str, n_cls: int) -> torch.Tensor:
    """`[B, N]` float32 start distribution over the alive tokens.

    "cls": the class token (position 0 when `n_cls` = 1) gets sqrt(N) times the mass of any other
    token, N = alive tokens; "uniform": 1/N each.
    """
    w = alive.float()
    if init == "cls" and n_cls > 0:
        n = w.sum(-1, keepdim=True)
        w = w.clone()
        w[:, :n_cls] = w[:, :n_cls] * n.sqrt()
    elif init != "uniform" and init != "cls":
        raise ValueError(f"init must be 'cls' or 'uniform', got {init!r}")
    return w / w.sum(-1, keepdim=True)


def weighted_pagerank_torch(attn: torch.Tensor, iters: int, alive: Optional[torch.Tensor] = None,
                            init: str = "cls", n_cls: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin.

    Args:
        attn: `[B, H, N, N]` attention probabilities (rows = queries).
        iters: power iterations (>= 1).
        alive: `[B, N]` bool, tokens still in play (default: all).
        init: "cls" or "uniform" start.
        n_cls: class tokens at the front that the "cls" start favours.
    Returns:
        scores `[B, H, N]` float32 (sum 1 over alive tokens, 0 elsewhere) and
        variance `[B, H]` of `N_alive * scores` over the alive tokens.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    batch, heads, n, _ = attn.shape
    if alive is None:
        alive = torch.ones(batch, n, dtype=torch.bool, device=attn.device)
    keys = alive[:, None, None, :].float()
    a = attn.float() * keys
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)  # rows renormalised over surviving keys
    a = a * alive[:, None, :, None].float()  # dropped queries pass no mass
    s = initial_scores(alive, init, n_cls)[:, None, :].expand(batch, heads, n).contiguous()
    for _ in range(iters):
        s = (s.unsqueeze(-2) @ a).squeeze(-2)  # s_t(j) = sum_i A'[i, j] s_{t-1}(i)
    n_alive = alive.float().sum(-1)[:, None]
    mask = alive[:, None, :].float()
    scaled = s * n_alive[..., None]
    mean = (scaled * mask).sum(-1) / n_alive
    var = (((scaled - mean[..., None]) ** 2) * mask).sum(-1) / n_alive
    return s, var


@triton.jit
def _wpr_start(alive, n_cls, CLS: tl.constexpr):
    """Start distribution of `initial_scores` for one row of `alive` (float32, 0 off the alive set)."""
    cols = tl.arange(0, alive.shape[0])
    w = tl.where(alive, 1.0, 0.0)
    if CLS:
        n_alive = tl.sum(w, axis=0)
        w = tl.where(cols < n_cls, w * tl.sqrt_rn(n_alive), w)
    return w / tl.sum(w, axis=0)


@triton.jit
def _wpr_finish(s, alive, valid, scores_ptr, var_ptr, pid, N):
    """Store the scores and the population variance of `N_alive * s` over the alive tokens."""
    cols = tl.arange(0, s.shape[0])
    n_alive = tl.sum(tl.where(alive, 1.0, 0.0), axis=0)
    scaled = s * n_alive
    mean = tl.sum(tl.where(alive, scaled, 0.0), axis=0) / n_alive
    dev = tl.where(alive, scaled - mean, 0.0)
    tl.store(scores_ptr + pid.to(tl.int64) * N + cols, s, mask=valid)
    tl.store(var_ptr + pid, tl.sum(dev * dev, axis=0) / n_alive)


@triton.jit
def _wpr_alive(alive_ptr, b, N, cols, valid_c, HAS_ALIVE: tl.constexpr):
    """Surviving tokens of image b (all valid columns when no mask was given)."""
    if HAS_ALIVE:
        return tl.load(alive_ptr + b.to(tl.int64) * N + cols, mask=valid_c, other=0) != 0
    return valid_c


@triton.jit
def _wpr_onchip_kernel(attn_ptr, alive_ptr, scores_ptr, var_ptr, H, N, n_cls, iters,
                       stride_b, stride_h, stride_i, stride_j,
                       BLOCK_N: tl.constexpr, HAS_ALIVE: tl.constexpr, CLS: tl.constexpr):
    """One (batch, head) per program; the attention tile is loaded once and reused every iteration."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_N)
    valid_r = rows < N
    valid_c = cols < N
    alive_c = _wpr_alive(alive_ptr, b, N, cols, valid_c, HAS_ALIVE)
    base = attn_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    ptrs = base + rows[:, None].to(tl.int64) * stride_i + cols[None, :].to(tl.int64) * stride_j
    # Dead keys are masked at the load, so they never enter row sums or receive mass.
    # The tile stays in the input dtype (half the registers for fp16/bf16); the row
    # renormalisation is folded into s instead: sum_i (a_ij / r_i) s_i = sum_i a_ij (s_i / r_i).
    a = tl.load(ptrs, mask=valid_r[:, None] & alive_c[None, :], other=0.0)
    inv_rows = 1.0 / tl.maximum(tl.sum(a.to(tl.float32), axis=1), 1e-30)
    # Dead queries need no zeroing: their score is 0 from the start and stays 0, because dead keys
    # never receive mass.

    s = _wpr_start(alive_c, n_cls, CLS)
    for _ in range(iters):
        s = tl.sum(a.to(tl.float32) * (s * inv_rows)[:, None], axis=0)
    _wpr_finish(s, alive_c, valid_c, scores_ptr, var_ptr, pid, N)


@triton.jit
def _wpr_stream_kernel(attn_ptr, alive_ptr, scores_ptr, var_ptr, H, N, n_cls, iters,
                       stride_b, stride_h, stride_i, stride_j,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       HAS_ALIVE: tl.constexpr, CLS: tl.constexpr):
    """One (batch, head) per program; A is too big for chip, so each iteration streams it in row blocks."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    cols = tl.arange(0, BLOCK_N)
    valid_c = cols < N
    alive_c = _wpr_alive(alive_ptr, b, N, cols, valid_c, HAS_ALIVE)
    base = attn_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h

    s = _wpr_start(alive_c, n_cls, CLS)
    for _ in range(iters):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            valid_r = rows < N
            ptrs = base + rows[:, None].to(tl.int64) * stride_i + cols[None, :].to(tl.int64) * stride_j
            a = tl.load(ptrs, mask=valid_r[:, None] & alive_c[None, :], other=0.0).to(tl.float32)
            # The block's s values live in the register vector s, which cannot be sliced: pick them
            # out with a one-hot reduction (on-chip work; the loop is bound by reading A anyway).
            s_rows = tl.sum(tl.where(rows[:, None] == cols[None, :], s[None, :], 0.0), axis=1)
            # Row sums come from the block already loaded, so renormalising costs no extra pass over A.
            row_sum = tl.maximum(tl.sum(a, axis=1), 1e-30)
            # s is 0 at dead queries (see the on-chip kernel), so they pass no mass unmasked.
            acc += tl.sum(a * (s_rows / row_sum)[:, None], axis=0)
        s = acc
    _wpr_finish(s, alive_c, valid_c, scores_ptr, var_ptr, pid, N)


def weighted_pagerank_triton(attn: torch.Tensor, iters: int, alive: Optional[torch.Tensor] = None,
                             init: str = "cls", n_cls: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `weighted_pagerank_torch` (same signature, same answers).

    One program per (batch, head) runs every iteration; float32 accumulation for any input dtype.
    """
    check_launch(_wpr_onchip_kernel, attn)
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if init not in ("cls", "uniform"):
        raise ValueError(f"init must be 'cls' or 'uniform', got {init!r}")
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [B, H, N, N], got {tuple(attn.shape)}")
    batch, heads, n, _ = attn.shape
    if alive is not None:
        if tuple(alive.shape) != (batch, n):
            raise ValueError(f"alive must be [B, N] = {(batch, n)}, got {tuple(alive.shape)}")
        alive = alive.to(device=attn.device, dtype=torch.bool).contiguous().view(torch.uint8)
    scores = torch.empty(batch, heads, n, dtype=torch.float32, device=attn.device)
    var = torch.empty(batch, heads, dtype=torch.float32, device=attn.device)
    if batch * heads == 0 or n == 0:
        return scores, var.fill_(float("nan"))
    alive_arg = alive if alive is not None else scores  # never read when HAS_ALIVE is False
    block_n = max(16, triton.next_power_of_2(n))
    common = dict(HAS_ALIVE=alive is not None, CLS=init == "cls")
    args = (attn, alive_arg, scores, var, heads, n, int(n_cls), int(iters), *attn.stride())
    grid = (batch * heads,)
    if block_n <= ONCHIP_MAX_BLOCK:
        # The whole tile lives in registers: spread it over more warps as it grows.
        warps = 4 if block_n <= 64 else (8 if block_n <= 128 else 16)
        _wpr_onchip_kernel[grid](*args, BLOCK_N=block_n, num_warps=warps, **common)
    else:
        block_r = 1 << max(0, (STREAM_BLOCK_ELEMS // block_n).bit_length() - 1)  # power of two
        _wpr_stream_kernel[grid](*args, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=8, **common)
    return scores, var


def weighted_pagerank(attn: torch.Tensor, iters: int, alive: Optional[torch.Tensor] = None,
                      init: str = "cls", n_cls: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the fused Triton kernel on CUDA (or when forced), the PyTorch twin elsewhere."""
    if use_triton(attn):
        return weighted_pagerank_triton(attn, iters, alive, init, n_cls)
    return weighted_pagerank_torch(attn, iters, alive, init, n_cls)
