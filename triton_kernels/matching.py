"""Bipartite matching and the size-weighted merge (ToMe, docs/methods.md), fused.

- `bipartite_match(metric, a_idx, b_idx)`: for each token of side A its best cosine score against
  side B and the index of that B token. The Triton kernel normalises rows on the fly and keeps a
  running max over blocks of B, so the `Na x Nb` score matrix never reaches global memory.
- `merge_wavg(x, size, keep, src, dst)`: the kept tokens in output order, each source added into
  its destination weighted by size, normalised by the summed sizes; x and size in one pass. The
  kernel reads the sources of each output row in a fixed order (sorted by destination, then by
  position in `src`), so results are deterministic: no float atomics.
  Without sources it only gathers (pruning: tokens not kept are dropped).

Sides are explicit index lists, so PiToMe's energy-ordered candidates and Zero-TPrune's importance
partition reuse the kernel; protected prefix tokens are simply left out of both lists.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import check_launch, use_triton


# ---------------------------------------------------------------- PyTorch twins

def bipartite_match_torch(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best cosine score `[B, Na]` (float32) of each A token and its index into `b_idx` `[B, Na]`.

    Ties go to the lower B index; a NaN score counts as -inf (never the best match), as in the kernel.
    """
    # the kernel's formula: raw dot products times both inverse norms (not normalise-then-dot), so
    # that scores equal in exact arithmetic round alike in both and ties break the same way
    feats = metric.float()
    inv = 1.0 / feats.square().sum(-1).sqrt().clamp_min(1e-12)
    d = feats.shape[-1]
    a = feats.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, d))
    b = feats.gather(1, b_idx.unsqueeze(-1).expand(-1, -1, d))
    scores = (a @ b.transpose(1, 2)) * inv.gather(1, a_idx).unsqueeze(-1) * inv.gather(1, b_idx).unsqueeze(1)
    return scores.masked_fill(scores.isnan(), float("-inf")).max(dim=-1)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge_wavg_torch(x: torch.Tensor, size: Optional[torch.Tensor], keep: torch.Tensor, src: Optional[torch.Tensor],
                     dst: Optional[torch.Tensor], *, csr=None, log_scale: Optional[float] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`x [B, N, C]`, `size [B, N, 1]` float32 (None: all ones) -> merged `x [B, K, C]` (x's dtype),
    `size [B, K, 1]`, and `log(size) * log_scale` `[B, K]` when `log_scale` is given (else None).

    Sums run in float32: sizes grow into the hundreds and half precision would lose them. `csr` is
    the kernel's (sources grouped by destination); the twin needs no grouping and ignores it.
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    out_size = _gather_rows(size, keep)
    if src is None or src.shape[1] == 0:
        out = _gather_rows(x, keep)
    else:
        src_size = _gather_rows(size, src)
        acc = _gather_rows(x, keep).float() * out_size
        acc = acc.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), _gather_rows(x, src).float() * src_size)
        out_size = out_size.scatter_add(1, dst.unsqueeze(-1), src_size)
        out = (acc / out_size).to(x.dtype)
    log_size = out_size.squeeze(-1).log() * log_scale if log_scale is not None else None
    return out, out_size, log_size


# ---------------------------------------------------------------- Triton kernels

@triton.jit
def _match_kernel(m_ptr, a_ptr, b_ptr, score_ptr, index_ptr, n_a, n_b, dim,
                  s_mb, s_mn, s_md, s_ab, s_bb,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)  # offsets in int64: B*N*C passes 2^31 at LLM widths
    offs_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a = offs_a < n_a
    rows_a = tl.load(a_ptr + batch * s_ab + offs_a, mask=mask_a, other=0)
    base = m_ptr + batch * s_mb
    # the feature dim is walked in chunks (keys have 64, CLIP hidden states 1024): raw dot
    # products first, then both inverse norms, so no chunk of features stays resident
    sq_a = tl.zeros([BLOCK_A], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + offs_d
        a = tl.load(base + rows_a[:, None] * s_mn + dd[None, :] * s_md,
                    mask=mask_a[:, None] & (dd[None, :] < dim), other=0.0).to(tl.float32)
        sq_a += tl.sum(a * a, axis=1)
    # IEEE-rounded sqrt and division (not the fast approximations), as the twin computes them
    inv_a = tl.div_rn(tl.full([BLOCK_A], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq_a), 1e-12))

    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, n_b, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask_b = offs_b < n_b
        rows_b = tl.load(b_ptr + batch * s_bb + offs_b, mask=mask_b, other=0)
        dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        sq_b = tl.zeros([BLOCK_B], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < dim
            a = tl.load(base + rows_a[:, None] * s_mn + dd[None, :] * s_md,
                        mask=mask_a[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            b = tl.load(base + rows_b[:, None] * s_mn + dd[None, :] * s_md,
                        mask=mask_b[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            # full fp32 products: a TF32 dot would reorder near-ties against the PyTorch twin
            dots = tl.dot(a, tl.trans(b), dots, input_precision="ieee")
            sq_b += tl.sum(b * b, axis=1)
        inv_b = tl.div_rn(tl.full([BLOCK_B], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq_b), 1e-12))
        scores = dots * inv_a[:, None] * inv_b[None, :]
        # NaN (a NaN key) counts as -inf, as in the twin: it must never win, nor hide a real score
        scores = tl.where(mask_b[None, :] & (scores == scores), scores, float("-inf"))
        block_best = tl.max(scores, axis=1)
        block_idx = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int32) + start
        better = block_best > best  # strict: on ties the earlier B token wins, as torch.max
        best = tl.where(better, block_best, best)
        best_idx = tl.where(better, block_idx, best_idx)
    tl.store(score_ptr + batch * n_a + offs_a, best, mask=mask_a)
    tl.store(index_ptr + batch * n_a + offs_a, best_idx.to(tl.int64), mask=mask_a)


@triton.jit
def _merge_kernel(x_ptr, size_ptr, keep_ptr, src_ptr, start_ptr, out_ptr, out_size_ptr, log_ptr,
                  n_tokens, n_keep, n_src, channels, log_scale,
                  s_xb, s_xn, s_xc,
                  HAS_SRC: tl.constexpr, HAS_SIZE: tl.constexpr, LOG_OUT: tl.constexpr, BLOCK_C: tl.constexpr):
    # int64 offsets: B*N*C passes 2^31 at LLM widths
    batch, row, cblock = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs_c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    token = tl.load(keep_ptr + batch * n_keep + row)
    if HAS_SIZE:
        weight = tl.load(size_ptr + batch * n_tokens + token)
    else:  # all sizes one: nothing to read (and no ones tensor to make)
        weight = 1.0
    x_row = tl.load(x_ptr + batch * s_xb + token * s_xn + offs_c * s_xc, mask=mask_c, other=0.0)
    total = weight
    if HAS_SRC:
        acc = x_row.to(tl.float32) * weight
        first = tl.load(start_ptr + batch * (n_keep + 1) + row)
        last = tl.load(start_ptr + batch * (n_keep + 1) + row + 1)
        for i in range(first, last):
            s = tl.load(src_ptr + batch * n_src + i)
            if HAS_SIZE:
                w = tl.load(size_ptr + batch * n_tokens + s)
            else:
                w = 1.0
            xs = tl.load(x_ptr + batch * s_xb + s * s_xn + offs_c * s_xc, mask=mask_c, other=0.0)
            acc += xs.to(tl.float32) * w
            total += w
        tl.store(out_ptr + (batch * n_keep + row) * channels + offs_c,
                 (acc / total).to(out_ptr.dtype.element_ty), mask=mask_c)
    else:
        tl.store(out_ptr + (batch * n_keep + row) * channels + offs_c, x_row, mask=mask_c)
    if cblock == 0:
        tl.store(out_size_ptr + batch * n_keep + row, total)
        if LOG_OUT:  # proportional attention's size channel for the next layers
            tl.store(log_ptr + batch * n_keep + row, tl.log(total) * log_scale)


def bipartite_match_triton(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `bipartite_match_torch`."""
    check_launch(_match_kernel, metric)
    batch, _, dim = metric.shape
    n_a, n_b = a_idx.shape[1], b_idx.shape[1]
    a_idx, b_idx = a_idx.expand(batch, -1).contiguous(), b_idx.expand(batch, -1).contiguous()
    score = torch.empty(batch, n_a, device=metric.device, dtype=torch.float32)
    index = torch.empty(batch, n_a, device=metric.device, dtype=torch.int64)
    if n_a == 0:
        return score, index
    if n_b == 0:
        return score.fill_(float("-inf")), index.zero_()
    block_a = 32 if n_a > 16 else 16
    grid = (batch, triton.cdiv(n_a, block_a))
    _match_kernel[grid](metric, a_idx, b_idx, score, index, n_a, n_b, dim,
                        metric.stride(0), metric.stride(1), metric.stride(2), a_idx.stride(0), b_idx.stride(0),
                        BLOCK_A=block_a, BLOCK_B=64, BLOCK_D=min(64, max(16, triton.next_power_of_2(dim))))
    return score, index


def _csr(dst: torch.Tensor, src: torch.Tensor, n_keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sources grouped by destination (stable) and row offsets `[B, K + 1]`."""
    order = dst.argsort(dim=1, stable=True)
    src_sorted = src.gather(1, order).contiguous()
    counts = torch.zeros(dst.shape[0], n_keep, dtype=torch.int64, device=dst.device)
    counts.scatter_add_(1, dst, torch.ones_like(dst))
    starts = F.pad(counts.cumsum(1), (1, 0)).contiguous()
    return src_sorted, starts


def merge_wavg_triton(x: torch.Tensor, size: Optional[torch.Tensor], keep: torch.Tensor, src: Optional[torch.Tensor],
                      dst: Optional[torch.Tensor], *, csr=None, log_scale: Optional[float] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Triton version of `merge_wavg_torch`: one launch, one program per (image, output token,
    channel block); `csr` (sources by destination, row starts) from the plan kernel saves the
    grouping here."""
    check_launch(_merge_kernel, x)
    batch, n_tokens, channels = x.shape
    n_keep = keep.shape[1]
    keep = keep.contiguous()
    if size is not None:
        size = size.float().contiguous()
    out = torch.empty(batch, n_keep, channels, device=x.device, dtype=x.dtype)
    out_size = torch.empty(batch, n_keep, 1, device=x.device, dtype=torch.float32)
    log_size = torch.empty(batch, n_keep, device=x.device, dtype=torch.float32) if log_scale is not None else None
    has_src = src is not None and src.shape[1] > 0
    if has_src:
        src_sorted, starts = csr if csr is not None else _csr(dst, src, n_keep)
    else:
        src_sorted = starts = keep  # unused by the kernel
    block_c = min(1024, triton.next_power_of_2(channels))
    grid = (batch, n_keep, triton.cdiv(channels, block_c))
    _merge_kernel[grid](x, size if size is not None else out_size, keep, src_sorted, starts, out, out_size,
                        log_size if log_size is not None else out_size,
                        n_tokens, n_keep, src_sorted.shape[1] if has_src else 0, channels,
                        float(log_scale) if log_scale is not None else 0.0,
                        x.stride(0), x.stride(1), x.stride(2),
                        HAS_SRC=has_src, HAS_SIZE=size is not None, LOG_OUT=log_scale is not None,
                        BLOCK_C=block_c)
    return out, out_size, log_size


# ---------------------------------------------------------------- dispatch

def bipartite_match(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(metric):
        return bipartite_match_triton(metric, a_idx, b_idx)
    return bipartite_match_torch(metric, a_idx, b_idx)


def merge_wavg(x: torch.Tensor, size: Optional[torch.Tensor], keep: torch.Tensor, src: Optional[torch.Tensor] = None,
               dst: Optional[torch.Tensor] = None, *, csr=None, log_scale: Optional[float] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Size-weighted merge (`size=None`: all ones); returns x, float32 sizes `[B, K, 1]` and, with
    `log_scale`, `log(size) * log_scale` `[B, K]` (proportional attention's size channel)."""
    # The kernel has no backward: when gradients must flow (training) the PyTorch twin runs.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (size is not None and size.requires_grad))
    if use_triton(x) and not needs_grad:
        return merge_wavg_triton(x, size, keep, src, dst, csr=csr, log_scale=log_scale)
    return merge_wavg_torch(x, size, keep, src, dst, csr=csr, log_scale=log_scale)
