"""The fused plan kernel (`triton_kernels/plan.py`): one launch from per-head keys to keep/src/dst
and the merge's CSR. Against its PyTorch twin, a loop reference, and the CSR the merge builds
itself. Runs through the Triton interpreter (small shapes)."""
import os

import pytest
import torch
import torch.nn.functional as F

from tome_plus.merging import Plan, merge_wavg
from tome_plus.triton_kernels import plan as P
from tome_plus.triton_kernels.matching import _csr

from naive import naive_bipartite_merge

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = 1e-5  # float32 rounding of a cosine, with room


def heads_view(batch, n, heads, dim, seed=0, dtype=torch.float32):
    """Per-head keys as the attention hands them over: a strided view of a qkv-like tensor."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, n, 3, heads, dim, generator=g).to(dtype)
    return qkv.permute(2, 0, 3, 1, 4)[1]  # [B, H, N, D], not contiguous


def assert_same(kernel, twin, metric=None, r=None, sides=None):
    """The kernel's plan is the twin's. Under the interpreter `tl.dot` is numpy's matmul, whose
    rounding depends on the machine's BLAS, so there (given the `metric`, `r` and `sides` to check
    against) a plan that differs must be one that float64 scores make optimal up to TOL."""
    same = all(torch.equal(getattr(kernel, f), getattr(twin, f)) for f in ("keep", "src", "dst"))
    if not same and INTERPRETED and metric is not None:
        assert_optimal(kernel, metric, r, sides)
    else:
        assert same
    src_sorted, starts = _csr(kernel.dst, kernel.src, kernel.keep.shape[1])
    assert torch.equal(kernel.csr[0], src_sorted) and torch.equal(kernel.csr[1], starts)


def assert_optimal(plan, metric, r, sides):
    """Each image's plan merges r A tokens whose best float64 cosine to B is among the r highest,
    each into a B token that reaches it, and keeps every other token (all up to TOL)."""
    unit = F.normalize(metric.double().mean(1), dim=-1)  # cosine on the head average, as ToMe
    for i, (a, b) in enumerate(sides):
        cos = unit[i, a] @ unit[i, b].T
        best = cos.max(-1).values
        src, dst = plan.src[i].tolist(), plan.keep[i, plan.dst[i]].tolist()
        assert len(src) == r and set(src) <= set(a.tolist()) and set(dst) <= set(b.tolist())
        merged = torch.tensor([a.tolist().index(t) for t in src], dtype=torch.long)
        rest = torch.ones(len(a), dtype=torch.bool)
        rest[merged] = False
        if rest.any() and r:
            assert best[merged].min() >= best[rest].max() - TOL
        targets = torch.tensor([b.tolist().index(t) for t in dst], dtype=torch.long)
        assert (cos[merged, targets] >= best[merged] - TOL).all()
        assert sorted(plan.keep[i].tolist() + src) == list(range(metric.shape[2]))


def alternate(batch, n, n_prefix):
    """ToMe's sides for every image: A and B positions of the alternate split."""
    first_a, _, first_b, _ = P.alternate_sides(n, n_prefix)
    return [(torch.arange(first_a, n, 2), torch.arange(first_b, n, 2))] * batch


@pytest.mark.parametrize("n,heads,dim,n_prefix,r", [
    (2, 1, 8, 0, 1), (17, 2, 8, 1, 0), (17, 2, 8, 1, 8), (40, 3, 16, 2, 12), (70, 2, 24, 5, 20),
    (197, 1, 64, 1, 16), (33, 4, 100, 1, 16),  # dim 100: two feature chunks
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_alternate_split_equals_twin(n, heads, dim, n_prefix, r, dtype):
    metric = heads_view(2, n, heads, dim, seed=n + r, dtype=dtype)
    assert_same(P.bipartite_plan_triton(metric, r, n_prefix), P.bipartite_plan_torch(metric, r, n_prefix),
                metric, r, alternate(2, n, n_prefix))


@pytest.mark.parametrize("n,n_prefix,k,protect", [(41, 1, 10, True), (41, 1, 7, False), (66, 4, 20, True)])
def test_explicit_sides_equal_twin(n, n_prefix, k, protect):
    """PiToMe's form: sides are strided slices of a permutation of the body, counted from n_prefix."""
    g = torch.Generator().manual_seed(n)
    metric = heads_view(3, n, 1, 12, seed=k)
    order = torch.stack([torch.randperm(n - n_prefix, generator=g) for _ in range(3)])
    if protect:  # all of A merges; the rest pass untouched (given unsorted)
        a, b, prot, r = order[:, 0:2 * k:2], order[:, 1:2 * k:2], order[:, 2 * k:], k
    else:  # ToMe matching on the energy-ordered split
        a, b, prot, r = order[:, 0::2], order[:, 1::2], None, k
    kernel = P.bipartite_plan_triton(metric, r, n_prefix, a, b, prot, offset=n_prefix)
    sides = [(a[i] + n_prefix, b[i] + n_prefix) for i in range(3)]
    assert_same(kernel, P.bipartite_plan_torch(metric, r, n_prefix, a, b, prot, offset=n_prefix), metric, r, sides)
    if protect:  # protected tokens in position order, right after the prefix
        untouched = kernel.keep[:, n_prefix:n_prefix + prot.shape[1]]
        assert torch.equal(untouched, (prot + n_prefix).sort(dim=-1).values)


@pytest.mark.parametrize("n,n_prefix,r", [(25, 1, 6), (30, 2, 9)])
def test_plan_and_merge_equal_loop_reference(n, n_prefix, r):
    torch.manual_seed(n)
    metric = heads_view(2, n, 3, 8, seed=r)
    x = torch.randn(2, n, 5)
    size = torch.randint(1, 5, (2, n, 1)).float()
    out = P.bipartite_plan_triton(metric, r, n_prefix)
    plan = Plan(keep=out.keep, src=out.src, dst=out.dst, csr=out.csr)
    merged, merged_size, _ = merge_wavg(plan, x, size)
    for b in range(2):
        ref_x, ref_size, _ = naive_bipartite_merge(x[b], size[b, :, 0], metric[b].mean(0), r, n_prefix)
        torch.testing.assert_close(merged[b], ref_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged_size[b, :, 0], ref_size)


def test_ties_and_nan():
    metric = torch.zeros(2, 1, 31, 4)
    metric[..., 0] = 1.0  # all keys equal: every score ties
    metric[1, 0, 8] = float("nan")  # an A token (even position) with a NaN key: ranks last
    kernel, twin = P.bipartite_plan_triton(metric, 9, 1), P.bipartite_plan_torch(metric, 9, 1)
    assert_same(kernel, twin)
    a_pos = list(range(2, 31, 2))
    assert kernel.src[0].tolist() == a_pos[:9]
    assert 8 not in kernel.src[1].tolist()


def test_r_larger_than_side_a_is_refused():
    with pytest.raises(ValueError, match="side A"):
        P.bipartite_plan(heads_view(1, 11, 1, 4), 6, 1)
