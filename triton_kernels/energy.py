"""PiToMe's energy score (docs/methods.md, PiToMe), row sums over cosine similarities computed on the fly.

paper (Eq. 4): E_i = (1/T) sum_{j != i} f_m(W_ij),  f_m(x) = x if x >= m else alpha (exp(x - m) - 1)
code ("elu"):  E_i = (1/T) sum_j ELU(W_ij - m, alpha)   (every j, the diagonal included)
with W_ij = cos(k_i, k_j) over the T tokens given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import check_launch, use_triton

VARIANTS = ("paper", "elu")


def energy_score_torch(metric: torch.Tensor, margin: float, alpha: float = 1.0,
                       variant: str = "paper") -> torch.Tensor:
    """PyTorch twin.

    Args:
        metric: `[B, T, d]` features of the T tokens (not normalised).
        margin: m.
        alpha: scale of the exponential branch.
        variant: "paper" or "elu".
    Returns:
        `[B, T]` float32 energies.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    unit = F.normalize(metric.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)
    t = sim.shape[-1]
    if variant == "elu":
        return F.elu(sim - margin, alpha=alpha).mean(-1)
    f = torch.where(sim >= margin, sim, alpha * (torch.exp(sim - margin) - 1))
    # j != i as "all j, less the self term": zeroing the diagonal would put the zero at a
    # different place in each row, so bit-equal tokens would sum in different orders and tie
    # differently here and in the kernel
    return (f.sum(-1) - f.diagonal(dim1=-2, dim2=-1)) / t


@triton.jit
def _energy_kernel(x_ptr, out_ptr, T, D, stride_b, stride_t, stride_d, margin, alpha,
                   ELU: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """One program: energies of rows [pid_i * BLOCK_I, +BLOCK_I) of image pid_b.

    Cosines are formed block by block (dot products of raw rows, then scaled by both inverse
    norms), reduced through f_m into row sums, and never stored.
    """
    pid_b = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    base = x_ptr + pid_b.to(tl.int64) * stride_b

    # Row norms first (d may span several BLOCK_D chunks); masked lanes load 0 and add nothing.
    sq_i = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        a = tl.load(base + rows[:, None] * stride_t + dd[None, :] * stride_d,
                    mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        sq_i += tl.sum(a * a, axis=1)
    # F.normalize divides by max(||x||, 1e-12), so a zero row gives cosines of 0, not NaN.
    inv_i = 1.0 / tl.maximum(tl.sqrt(sq_i), 1e-12)

    total = tl.zeros((BLOCK_I,), dtype=tl.float32)
    self_term = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j0 in range(0, T, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < T
        dots = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        sq_j = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            a = tl.load(base + rows[:, None] * stride_t + dd[None, :] * stride_d,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            b = tl.load(base + cols[:, None] * stride_t + dd[None, :] * stride_d,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            # "ieee": full fp32 products (tf32 would cost ~1e-3 on cosines next to a margin).
            dots = tl.dot(a, tl.trans(b), dots, input_precision="ieee")
            sq_j += tl.sum(b * b, axis=1)
        inv_j = 1.0 / tl.maximum(tl.sqrt(sq_j), 1e-12)
        w = dots * inv_i[:, None] * inv_j[None, :]

        z = w - margin
        # min(z, 0): the exponential is only kept where z <= 0 (or z < 0), so clamping changes
        # nothing there and keeps exp from overflowing on the branch that is thrown away.
        soft = alpha * (tl.exp(tl.minimum(z, 0.0)) - 1.0)
        keep = row_ok[:, None] & col_ok[None, :]
        if ELU:
            f = tl.where(z > 0, z, soft)
        else:
            f = tl.where(w >= margin, w, soft)
            # Eq. 4 sums over j != i: all j, less the self term (as the twin; see there why)
            self_term += tl.sum(tl.where(keep & (rows[:, None] == cols[None, :]), f, 0.0), axis=1)
        total += tl.sum(tl.where(keep, f, 0.0), axis=1)

    tl.store(out_ptr + pid_b * T + rows, (total - self_term) / T, mask=row_ok)


def energy_score_triton(metric: torch.Tensor, margin: float, alpha: float = 1.0,
                        variant: str = "paper") -> torch.Tensor:
    """Triton version of `energy_score_torch` (same signature, same answers).

    Reads `metric` through its strides (no copy) in its own dtype and computes in fp32.
    """
    check_launch(_energy_kernel, metric)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, T, d], got shape {tuple(metric.shape)}")
    batch, t, d = metric.shape
    out = torch.empty(batch, t, dtype=torch.float32, device=metric.device)
    if out.numel() == 0:
        return out
    # tl.dot needs every block dim >= 16; d beyond 64 is walked in chunks to bound registers.
    block = min(64, max(16, triton.next_power_of_2(t)))
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    grid = (batch, triton.cdiv(t, block))
    _energy_kernel[grid](metric, out, t, d, metric.stride(0), metric.stride(1), metric.stride(2),
                         float(margin), float(alpha), ELU=(variant == "elu"),
                         BLOCK_I=block, BLOCK_J=block, BLOCK_D=block_d)
    return out


def energy_score(metric: torch.Tensor, margin: float, alpha: float = 1.0, variant: str = "paper") -> torch.Tensor:
    """Dispatch: Triton on CUDA (or when forced), the PyTorch twin elsewhere."""
    if use_triton(metric):
        return energy_score_triton(metric, margin, alpha, variant)
    return energy_score_torch(metric, margin, alpha, variant)
