"""PiToMe energy kernel: Triton (interpreted on CPU) vs the PyTorch twin vs a plain-loop reference."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tome_plus.triton_kernels.energy import energy_score, energy_score_torch, energy_score_triton

from conftest import all_pairs
from naive import naive_energy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Both implementations upcast to fp32 before any arithmetic, so half inputs differ only in the
# data they feed in; the looser half tolerances leave room for the denser ties such data makes.
TOL = {torch.float32: 1e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
MARGINS = (0.9, 0.0, -0.3)
ALPHAS = (1.0, 0.5)
VARIANTS = ("paper", "elu")
NEAR = 1e-5  # cosines this close to the margin may round to either side of it


def clustered(batch, t, d, dtype, seed):
    """Tokens around a few centres, so cosines spread over [-1, 1] and a margin of 0.9 matters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, 4, d, generator=g)
    pick = torch.randint(0, 4, (batch, t), generator=g)
    x = torch.gather(centres, 1, pick[..., None].expand(batch, t, d))
    x = x + 0.4 * torch.randn(batch, t, d, generator=g)
    return x.to(dtype).to(DEVICE)


def assert_close_energy(got, ref, metric, margin, variant, tol):
    """Elementwise check; paper's f_m jumps by m at W = m, so rows holding a cosine within NEAR of
    a nonzero margin get |m| / T of slack per such cosine (ELU is continuous: no slack)."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    slack = torch.zeros_like(ref)
    if variant == "paper" and margin != 0.0:
        unit = F.normalize(metric.float(), dim=-1)
        sim = unit @ unit.transpose(1, 2)
        t = sim.shape[-1]
        near = ((sim - margin).abs() < NEAR) & ~torch.eye(t, dtype=torch.bool, device=sim.device)
        slack = abs(margin) * near.sum(-1) / t
    err = (got - ref).abs()
    bound = tol + tol * ref.abs() + slack
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}"


def _cases():
    cases = []
    # Small T (no full block, one block, a prime): batch 7, margin x alpha x variant x dtype x T as
    # all pairs (the whole product with TOME_PLUS_TEST_FULL=1), d alternating.
    for t, dtype, variant, m, a in all_pairs((1, 2, 3, 61), list(TOL), VARIANTS, MARGINS, ALPHAS):
        cases.append((7, t, (64, 48)[len(cases) % 2], dtype, variant, m, a))
    # Large T (ViT-S/B 197, 257, ViT-L@336 577), several row and column blocks: a small batch and
    # one margin/alpha per (dtype, variant), rotated so each T sees every margin, alpha and d.
    for batch, t in ((2, 197), (1, 257), (1, 577)):
        for k, (dtype, variant) in enumerate((dt, v) for dt in TOL for v in VARIANTS):
            cases.append((batch, t, (64, 48)[(k // 2 + k) % 2], dtype, variant, MARGINS[k % 3], ALPHAS[(k // 3) % 2]))
    return cases


@pytest.mark.parametrize("batch,t,d,dtype,variant,margin,alpha", _cases(),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_triton_matches_torch(batch, t, d, dtype, variant, margin, alpha):
    x = clustered(batch, t, d, dtype, seed=t * 131 + d)
    ref = energy_score_torch(x, margin, alpha, variant)
    got = energy_score_triton(x, margin, alpha, variant)
    assert_close_energy(got, ref, x, margin, variant, TOL[dtype])


@pytest.mark.parametrize("layout", ["transposed", "strided_tokens", "sliced_features"])
def test_non_contiguous(layout):
    g = torch.Generator().manual_seed(3)
    if layout == "transposed":  # [B, d, T] storage viewed as [B, T, d]
        x = torch.randn(3, 48, 70, generator=g).transpose(1, 2)
    elif layout == "strided_tokens":
        x = torch.randn(3, 140, 64, generator=g)[:, ::2]
    else:
        x = torch.randn(3, 70, 100, generator=g)[:, :, 10:74]
    x = x.to(DEVICE)
    assert not x.is_contiguous()
    for variant in VARIANTS:
        ref = energy_score_torch(x, 0.2, 0.5, variant)
        got = energy_score_triton(x, 0.2, 0.5, variant)
        assert_close_energy(got, ref, x, 0.2, variant, 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("margin,alpha", [(0.45, 1.0), (0.0, 0.5), (-0.2, 0.7)])
def test_naive_loops(variant, margin, alpha):
    torch.manual_seed(5)
    x = torch.randn(2, 5, 7)  # d = 7: padded to a 16-wide block inside the kernel
    x[1, 2] = 0.0  # a zero token: cosines of 0 through the 1e-12 norm guard, no NaN
    unit = F.normalize(x, dim=-1)
    sim = unit @ unit.transpose(1, 2)
    # Keep the comparison meaningful: no cosine may sit on paper's jump at W = m.
    if margin != 0.0:
        assert (sim - margin).abs().min() > 1e-3
    ref = torch.stack([naive_energy(x[b], margin, alpha, variant) for b in range(2)]).float()
    # The zero token's cosines are all 0 (its own included), so its energy is known in closed form.
    if variant == "paper":
        zero_row = 4 / 5 * (0.0 if 0.0 >= margin else alpha * (math.exp(-margin) - 1))
    else:
        zero_row = -margin if margin < 0 else alpha * (math.exp(-margin) - 1)
    assert math.isclose(float(ref[1, 2]), zero_row, abs_tol=1e-7)
    for impl in (energy_score_torch, energy_score_triton):
        got = impl(x.to(DEVICE), margin, alpha, variant).cpu()
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 5, 64, 100])
@pytest.mark.parametrize("margin", [0.9, 0.0, -0.5])
def test_identical_tokens(t, margin):
    torch.manual_seed(t)
    x = torch.randn(1, 1, 48).expand(2, t, 48).to(DEVICE)  # every W_ij = 1 (to rounding)
    for impl in (energy_score_torch, energy_score_triton):
        paper = impl(x, margin, 0.5, "paper")
        elu = impl(x, margin, 0.5, "elu")
        torch.testing.assert_close(paper, torch.full_like(paper, (t - 1) / t), atol=1e-6, rtol=0)
        torch.testing.assert_close(elu, torch.full_like(elu, 1.0 - margin), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_tokens_margin_one(dtype):
    """m = 1 sits on paper's jump, so use a token whose cosine with itself is exactly 1: all ones
    over d = 64 normalise to 1/8 each, and 64 products of 1/64 sum exactly."""
    x = torch.ones(1, 9, 64, dtype=dtype, device=DEVICE)
    for impl in (energy_score_torch, energy_score_triton):
        torch.testing.assert_close(impl(x, 1.0, 1.0, "paper"), torch.full((1, 9), 8 / 9, device=DEVICE))
        torch.testing.assert_close(impl(x, 1.0, 1.0, "elu"), torch.zeros(1, 9, device=DEVICE))


def test_empty_token_set():
    x = torch.randn(2, 0, 64, device=DEVICE)
    assert energy_score_triton(x, 0.5).shape == (2, 0)


def test_unknown_variant():
    x = torch.randn(1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="variant"):
        energy_score_triton(x, 0.5, 1.0, "softplus")
    with pytest.raises(ValueError, match="variant"):
        energy_score_torch(x, 0.5, 1.0, "softplus")


def test_float64_rejected():
    with pytest.raises(TypeError):
        energy_score_triton(torch.randn(1, 4, 16, dtype=torch.float64, device=DEVICE), 0.5)


def test_dispatch_forced_triton(monkeypatch):
    x = clustered(2, 30, 64, torch.float32, seed=9)
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    got = energy_score(x, 0.5, 1.0, "paper")
    monkeypatch.setenv("TOME_PLUS_KERNELS", "torch")
    ref = energy_score(x, 0.5, 1.0, "paper")
    assert_close_energy(got, ref, x, 0.5, "paper", 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bit_equal_tokens_tie_alike_in_both_paths(variant):
    """A half-flat image gives bit-equal keys: each path must give them bit-equal energies (the
    j != i of Eq. 4 once put the zero at a different place in each row, so equal tokens summed in
    different orders), so that both order them by position and PiToMe picks the same tokens."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 64, generator=g)
    x[:, 3:40:2] = x[:, 3:4]  # every other token from 3 on: one flat patch
    x = x.to(DEVICE)
    twin, kernel = energy_score_torch(x, 0.5, 1.0, variant), energy_score_triton(x, 0.5, 1.0, variant)
    assert torch.equal(twin[:, 3:40:2], twin[:, 3:4].expand(-1, 19))
    if INTERPRETED:
        # tl.dot is numpy's matmul here, and the machine's BLAS may give bit-equal rows dot products
        # that differ in the last bit by where they sit in a tile: only a tolerance holds
        assert_close_energy(kernel, twin, x, 0.5, variant, 1e-5)
        return
    assert torch.equal(kernel[:, 3:40:2], kernel[:, 3:4].expand(-1, 19))
    order = lambda e: e.argsort(dim=-1, descending=True, stable=True)
    assert torch.equal(order(twin), order(kernel))
