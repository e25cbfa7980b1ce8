"""Bipartite soft matching from keys to a finished plan, in one launch (docs/methods.md, ToMe).

`bipartite_plan(metric, r, n_prefix, a_idx=None, b_idx=None, protected=None)` returns the plan of
ToMe's step: which tokens stay (`keep`, output order), which merge away (`src`, best-matched first)
and where to (`dst`, output positions), plus the merge's sources grouped by destination (`csr`).

- `metric` is `[B, H, N, D]`: per-head keys straight from the attention (a strided view, nothing
  copied), averaged over heads here; `H = 1` takes any `[B, 1, N, C]` metric (PiToMe's averaged
  keys, CLIP hidden states). Cosine on the head average.
- Sides: alternate positions after the `n_prefix` protected tokens (A = even, B = odd, ToMe's
  parity), or explicit `a_idx` / `b_idx` (`[B, Na]`, `[B, Nb]`, any strides, positions counted
  from `offset`, so PiToMe's `argsort(energy[:, p:])` and its `[:, 0::2]` slices go in as they
  are); `protected` (`[B, P]`, same form) pass untouched. The `r` best-matched A tokens merge
  into their most similar B token.
- Output order: prefix, protected and unmerged A each in position order, B in the order given.
- Ties (bit-equal scores) break by order, lower first, everywhere: the best match among equal
  scores is the first in B, equal scores rank by their order in A (position for the alternate
  split, the given order for explicit sides); a NaN score counts as -inf. Twin and kernel compute
  scores by the same formula (raw dots times IEEE-rounded inverse norms), so bit-equal tokens tie
  in both; scores that differ only by summation-order rounding can still order differently.

The Triton kernel runs one program per image through five passes over small scratch buffers (head
average and norms, best match per A token, rank, plan, CSR), so the score matrix never reaches
global memory and the launch replaces about fifteen PyTorch ops (mean, normalise, gather, matmul,
max, argsort, sort, arange, cat, and the CSR of the merge).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import check_launch, use_triton
from .matching import bipartite_match_torch


@dataclass
class BipartitePlan:
    keep: torch.Tensor  # [B, K] int64, positions kept, in output order
    src: torch.Tensor  # [B, r] int64, positions merged away, best-matched first
    dst: torch.Tensor  # [B, r] int64, output position each source merges into
    csr: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # sources by destination, row starts [B, K + 1]


def alternate_sides(n_tokens: int, n_prefix: int) -> Tuple[int, int, int, int]:
    """First A position, A count, first B position, B count of ToMe's alternate split.

    Keeping the absolute parity (A = even positions) reproduces ToMe's merges exactly; the prefix
    tokens leave both sides (ToMe's -inf protection, for any number of prefix tokens).
    """
    first_a = n_prefix + n_prefix % 2
    first_b = n_prefix + 1 - n_prefix % 2
    return first_a, max(0, (n_tokens - first_a + 1) // 2), first_b, max(0, (n_tokens - first_b + 1) // 2)


# ---------------------------------------------------------------- PyTorch twin

def bipartite_plan_torch(metric: torch.Tensor, r: int, n_prefix: int, a_idx: Optional[torch.Tensor] = None,
                         b_idx: Optional[torch.Tensor] = None, protected: Optional[torch.Tensor] = None,
                         offset: int = 0) -> BipartitePlan:
    batch, _, n_tokens, _ = metric.shape
    device = metric.device
    if a_idx is not None:
        a_idx, b_idx = a_idx + offset, b_idx + offset
    if protected is not None:
        protected = (protected + offset).sort(dim=-1).values
    if a_idx is None:
        first_a, n_a, first_b, n_b = alternate_sides(n_tokens, n_prefix)
        a_idx = torch.arange(first_a, first_a + 2 * n_a, 2, device=device).expand(batch, -1)
        b_idx = torch.arange(first_b, first_b + 2 * n_b, 2, device=device).expand(batch, -1)
    # heads summed, not averaged, as the kernel does (the 1/H cancels in the cosine)
    node_max, node_idx = bipartite_match_torch(metric.sum(dim=1, dtype=torch.float32), a_idx, b_idx)
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    src_rank, unm_rank = order[:, :r], order[:, r:]
    src = a_idx.gather(1, src_rank)
    unm = a_idx.gather(1, unm_rank).sort(dim=-1).values
    prefix = torch.arange(n_prefix, device=device).expand(batch, -1)
    parts = [prefix] + ([protected] if protected is not None else []) + [unm, b_idx]
    keep = torch.cat(parts, dim=1)
    dst = node_idx.gather(1, src_rank) + (keep.shape[1] - b_idx.shape[1])
    return BipartitePlan(keep=keep, src=src, dst=dst)


# ---------------------------------------------------------------- Triton kernel

@triton.jit
def _side_pos(idx_ptr, s_row, s_col, b, offs, valid, first, ALTERNATE: tl.constexpr):
    """Token positions of entries `offs` of a side: ToMe's alternate split, or an index list
    (`first` is then the offset its positions count from)."""
    if ALTERNATE:
        return (first + 2 * offs).to(tl.int64)
    return tl.load(idx_ptr + b * s_row + offs * s_col, mask=valid, other=0).to(tl.int64) + first


@triton.jit
def _average_rows(m_ptr, b, pos, valid, feat_ptr, inv_ptr, row0, heads, dim,
                  s_mb, s_mh, s_mn, s_md, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head-summed rows of `pos` into the scratch features (rows row0...), and their inverse norms."""
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + offs_d
        ok = valid[:, None] & (dd[None, :] < dim)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for h in range(heads):
            acc += tl.load(m_ptr + b * s_mb + h * s_mh + pos[:, None] * s_mn + dd[None, :] * s_md,
                           mask=ok, other=0.0).to(tl.float32)
        tl.store(feat_ptr + (row0 + offs)[:, None] * dim + dd[None, :], acc, mask=ok)
        sq += tl.sum(acc * acc, axis=1)
    # the mean's 1/H cancels in the cosine
    # IEEE-rounded sqrt and division, as the twin computes them
    tl.store(inv_ptr + row0 + offs, tl.div_rn(tl.full([BLOCK], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), 1e-12)),
             mask=valid)


@triton.jit
def _plan_kernel(m_ptr, a_ptr, b_ptr, prot_ptr,
                 keep_ptr, src_ptr, dst_ptr, csr_ptr, start_ptr,
                 feat_ptr, inv_ptr, best_ptr, idx_ptr, rank_ptr,
                 heads, dim, n_a, n_b, n_prot, n_prefix, r, n_keep, first_a, first_b, offset,
                 s_mb, s_mh, s_mn, s_md, s_ab, s_a1, s_bb, s_b1, s_pb, s_p1,
                 ALTERNATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    n_side = n_a + n_b
    feat_ptr += b * n_side * dim  # per-image scratch
    inv_ptr += b * n_side
    best_ptr += b * n_a
    idx_ptr += b * n_a
    rank_ptr += b * n_a

    # 1. head-averaged rows of A (scratch rows 0..Na) and B (rows Na..), and inverse norms
    for i0 in range(0, n_a, BLOCK):
        valid = i0 + offs < n_a
        pos = _side_pos(a_ptr, s_ab, s_a1, b, i0 + offs, valid, first_a, ALTERNATE)
        _average_rows(m_ptr, b, pos, valid, feat_ptr, inv_ptr, i0, heads, dim,
                      s_mb, s_mh, s_mn, s_md, BLOCK, BLOCK_D)
    for j0 in range(0, n_b, BLOCK):
        valid = j0 + offs < n_b
        pos = _side_pos(b_ptr, s_bb, s_b1, b, j0 + offs, valid, first_b, ALTERNATE)
        _average_rows(m_ptr, b, pos, valid, feat_ptr, inv_ptr, n_a + j0, heads, dim,
                      s_mb, s_mh, s_mn, s_md, BLOCK, BLOCK_D)
    tl.debug_barrier()

    # 2. best cosine match in B of every A token (running max over B blocks; earlier wins ties)
    for i0 in range(0, n_a, BLOCK):
        rows_a = i0 + offs
        ok_a = rows_a < n_a
        inv_a = tl.load(inv_ptr + rows_a, mask=ok_a, other=0.0)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, n_b, BLOCK):
            rows_b = j0 + offs
            ok_b = rows_b < n_b
            dots = tl.zeros([BLOCK, BLOCK], tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                dd = d0 + offs_d
                fa = tl.load(feat_ptr + rows_a[:, None] * dim + dd[None, :],
                             mask=ok_a[:, None] & (dd[None, :] < dim), other=0.0)
                fb = tl.load(feat_ptr + (n_a + rows_b)[:, None] * dim + dd[None, :],
                             mask=ok_b[:, None] & (dd[None, :] < dim), other=0.0)
                # full fp32 products: TF32 would reorder near-ties against the twin
                dots = tl.dot(fa, tl.trans(fb), dots, input_precision="ieee")
            inv_b = tl.load(inv_ptr + n_a + rows_b, mask=ok_b, other=0.0)
            scores = dots * inv_a[:, None] * inv_b[None, :]
            scores = tl.where(ok_b[None, :] & (scores == scores), scores, float("-inf"))  # NaN -> -inf
            block_best = tl.max(scores, axis=1)
            block_idx = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int32) + j0
            better = block_best > best
            best = tl.where(better, block_best, best)
            best_idx = tl.where(better, block_idx, best_idx)
        tl.store(best_ptr + rows_a, best, mask=ok_a)
        tl.store(idx_ptr + rows_a, best_idx, mask=ok_a)
    tl.debug_barrier()

    # 3. rank of every A token: better scores first, equal scores by position in A
    for i0 in range(0, n_a, BLOCK):
        rows_i = i0 + offs
        ok_i = rows_i < n_a
        s_i = tl.load(best_ptr + rows_i, mask=ok_i, other=0.0)
        rank = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, n_a, BLOCK):
            rows_j = j0 + offs
            ok_j = rows_j < n_a
            s_j = tl.load(best_ptr + rows_j, mask=ok_j, other=0.0)
            ahead = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (rows_j[None, :] < rows_i[:, None]))
            rank += tl.sum((ahead & ok_j[None, :]).to(tl.int32), axis=1)
        tl.store(rank_ptr + rows_i, rank, mask=ok_i)
    tl.debug_barrier()

    # 4. the plan: prefix, protected, unmerged A in position order, B; sources in rank order
    base_b = n_prefix + n_prot + n_a - r
    for p0 in range(0, n_prefix, BLOCK):
        tl.store(keep_ptr + b * n_keep + p0 + offs, (p0 + offs).to(tl.int64), mask=p0 + offs < n_prefix)
    for p0 in range(0, n_prot, BLOCK):  # protected tokens in position order (positions are unique)
        ok_t = p0 + offs < n_prot
        pos_t = _side_pos(prot_ptr, s_pb, s_p1, b, p0 + offs, ok_t, offset, False)
        before = tl.zeros([BLOCK], tl.int32)
        for u0 in range(0, n_prot, BLOCK):
            ok_u = u0 + offs < n_prot
            pos_u = _side_pos(prot_ptr, s_pb, s_p1, b, u0 + offs, ok_u, offset, False)
            before += tl.sum((ok_u[None, :] & (pos_u[None, :] < pos_t[:, None])).to(tl.int32), axis=1)
        tl.store(keep_ptr + b * n_keep + n_prefix + before, pos_t, mask=ok_t)
    for j0 in range(0, n_b, BLOCK):
        ok = j0 + offs < n_b
        pos = _side_pos(b_ptr, s_bb, s_b1, b, j0 + offs, ok, first_b, ALTERNATE)
        tl.store(keep_ptr + b * n_keep + base_b + j0 + offs, pos, mask=ok)
    for i0 in range(0, n_a, BLOCK):
        rows_i = i0 + offs
        ok_i = rows_i < n_a
        pos_i = _side_pos(a_ptr, s_ab, s_a1, b, rows_i, ok_i, first_a, ALTERNATE)
        rank_i = tl.load(rank_ptr + rows_i, mask=ok_i, other=0)
        merged = ok_i & (rank_i < r)
        tl.store(src_ptr + b * r + rank_i, pos_i, mask=merged)
        tl.store(dst_ptr + b * r + rank_i,
                 base_b + tl.load(idx_ptr + rows_i, mask=ok_i, other=0).to(tl.int64), mask=merged)
        before = tl.zeros([BLOCK], tl.int32)  # unmerged A tokens at lower positions
        for j0 in range(0, n_a, BLOCK):
            rows_j = j0 + offs
            ok_j = rows_j < n_a
            pos_j = _side_pos(a_ptr, s_ab, s_a1, b, rows_j, ok_j, first_a, ALTERNATE)
            rank_j = tl.load(rank_ptr + rows_j, mask=ok_j, other=0)
            lower = ok_j[None, :] & (rank_j[None, :] >= r) & (pos_j[None, :] < pos_i[:, None])
            before += tl.sum(lower.to(tl.int32), axis=1)
        tl.store(keep_ptr + b * n_keep + n_prefix + n_prot + before, pos_i, mask=ok_i & (rank_i >= r))
    tl.debug_barrier()

    # 5. the merge's CSR: sources ordered by (destination, rank), row starts of every output token
    for i0 in range(0, r, BLOCK):
        rows_i = i0 + offs
        ok_i = rows_i < r
        d_i = tl.load(dst_ptr + b * r + rows_i, mask=ok_i, other=0)
        slot = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, r, BLOCK):
            rows_j = j0 + offs
            ok_j = rows_j < r
            d_j = tl.load(dst_ptr + b * r + rows_j, mask=ok_j, other=0)
            ahead = (d_j[None, :] < d_i[:, None]) | ((d_j[None, :] == d_i[:, None]) & (rows_j[None, :] < rows_i[:, None]))
            slot += tl.sum((ahead & ok_j[None, :]).to(tl.int32), axis=1)
        tl.store(csr_ptr + b * r + slot, tl.load(src_ptr + b * r + rows_i, mask=ok_i, other=0), mask=ok_i)
    for k0 in range(0, n_keep + 1, BLOCK):
        rows_k = k0 + offs
        count = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, r, BLOCK):
            rows_j = j0 + offs
            d_j = tl.load(dst_ptr + b * r + rows_j, mask=rows_j < r, other=0)
            count += tl.sum(((rows_j[None, :] < r) & (d_j[None, :] < rows_k[:, None])).to(tl.int32), axis=1)
        tl.store(start_ptr + b * (n_keep + 1) + rows_k, count.to(tl.int64), mask=rows_k < n_keep + 1)


def bipartite_plan_triton(metric: torch.Tensor, r: int, n_prefix: int, a_idx: Optional[torch.Tensor] = None,
                          b_idx: Optional[torch.Tensor] = None, protected: Optional[torch.Tensor] = None,
                          offset: int = 0) -> BipartitePlan:
    """Triton version of `bipartite_plan_torch`, with the merge's CSR; one launch."""
    check_launch(_plan_kernel, metric)
    batch, heads, n_tokens, dim = metric.shape
    device = metric.device
    alternate = a_idx is None
    if alternate:
        first_a, n_a, first_b, n_b = alternate_sides(n_tokens, n_prefix)
        a_idx = b_idx = metric  # never read
        a_strides = b_strides = (0, 0)
    else:
        first_a = first_b = offset
        n_a, n_b = a_idx.shape[1], b_idx.shape[1]
        a_strides, b_strides = a_idx.stride(), b_idx.stride()
    n_prot = protected.shape[1] if protected is not None else 0
    p_strides = protected.stride() if protected is not None else (0, 0)
    n_keep = n_prefix + n_prot + n_a + n_b - r
    i64 = dict(device=device, dtype=torch.int64)
    keep = torch.empty(batch, n_keep, **i64)
    src = torch.empty(batch, r, **i64)
    dst = torch.empty(batch, r, **i64)
    csr = torch.empty(batch, r, **i64)
    starts = torch.empty(batch, n_keep + 1, **i64)
    # per-image scratch: head-averaged rows, inverse norms, best match, its index, rank
    feat = torch.empty(batch, (n_a + n_b) * dim, device=device, dtype=torch.float32)
    inv = torch.empty(batch, n_a + n_b, device=device, dtype=torch.float32)
    best = torch.empty(batch, n_a, device=device, dtype=torch.float32)
    idx = torch.empty(batch, n_a, device=device, dtype=torch.int32)
    rank = torch.empty(batch, n_a, device=device, dtype=torch.int32)
    block = 64 if max(n_a, n_b, n_prot, r) > 32 else (32 if max(n_a, n_b, n_prot, r) > 16 else 16)
    _plan_kernel[(batch,)](metric, a_idx, b_idx, protected if protected is not None else metric,
                           keep, src, dst, csr, starts, feat, inv, best, idx, rank,
                           heads, dim, n_a, n_b, n_prot, n_prefix, r, n_keep, first_a, first_b, offset,
                           *metric.stride(), *a_strides, *b_strides, *p_strides,
                           ALTERNATE=alternate, BLOCK=block,
                           BLOCK_D=min(64, max(16, triton.next_power_of_2(dim))), num_warps=4)
    return BipartitePlan(keep=keep, src=src, dst=dst, csr=(csr, starts))


# ---------------------------------------------------------------- dispatch

def bipartite_plan(metric: torch.Tensor, r: int, n_prefix: int, a_idx: Optional[torch.Tensor] = None,
                   b_idx: Optional[torch.Tensor] = None, protected: Optional[torch.Tensor] = None,
                   offset: int = 0) -> BipartitePlan:
    """ToMe's plan for `[B, H, N, D]` keys (see the module docstring); Triton on CUDA, else the twin."""
    n_a = a_idx.shape[1] if a_idx is not None else alternate_sides(metric.shape[2], n_prefix)[1]
    if not 0 <= r <= n_a:
        raise ValueError(f"r={r} must lie in [0, {n_a}], the tokens of side A")
    with torch.no_grad():
        if use_triton(metric):
            return bipartite_plan_triton(metric, r, n_prefix, a_idx, b_idx, protected, offset)
        return bipartite_plan_torch(metric, r, n_prefix, a_idx, b_idx, protected, offset)
