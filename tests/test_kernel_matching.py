"""Bipartite matching and fused merge: Triton (interpreter on CPU) vs. the PyTorch twin vs. loops."""
import pytest
import torch

import tome_plus
from tome_plus.triton_kernels import check_launch
from tome_plus.triton_kernels.matching import (bipartite_match_torch, bipartite_match_triton, merge_wavg_torch,
                                               merge_wavg_triton)

from conftest import make
from naive import assert_best_matches, assert_same_matches, loop_cosines

SHAPES = [(1, 1), (1, 2), (7, 3), (7, 61), (1, 197), (2, 257), (1, 577)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def split(n, n_prefix, batch, shuffled=False, seed=0):
    """Alternate split of the non-prefix tokens, or a random partition (PiToMe/Zero-TPrune style)."""
    body = torch.arange(n_prefix, n)
    if shuffled:
        g = torch.Generator().manual_seed(seed)
        rows = [body[torch.randperm(len(body), generator=g)] for _ in range(batch)]
        body = torch.stack(rows) if rows else body.expand(batch, -1)
    else:
        body = body.expand(batch, -1)
    a, b = body[:, ::2], body[:, 1::2]
    if b.shape[1] == 0:  # one token: match it against itself
        b = a
    return a.contiguous(), b.contiguous()


def naive_match(metric, a_idx, b_idx):
    scores, index = [], []
    for m, ai, bi in zip(metric.float(), a_idx, b_idx):
        unit = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        row_s, row_i = [], []
        for i in ai.tolist():
            best, best_j = float("-inf"), 0
            for j, tok in enumerate(bi.tolist()):
                s = float(unit[i] @ unit[tok])
                if s > best:
                    best, best_j = s, j
            row_s.append(best)
            row_i.append(best_j)
        scores.append(row_s)
        index.append(row_i)
    return torch.tensor(scores), torch.tensor(index)


@pytest.mark.parametrize("batch,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_prefix,shuffled", [(0, False), (1, False), (5, True)])
def test_match_triton_equals_torch(batch, n, dtype, n_prefix, shuffled):
    if n - n_prefix < 1:
        pytest.skip("no reducible tokens")
    torch.manual_seed(n)
    metric = torch.randn(batch, n, 40).to(dtype)
    a_idx, b_idx = split(n, n_prefix, batch, shuffled)
    s_ref, i_ref = bipartite_match_torch(metric, a_idx, b_idx)
    s_tri, i_tri = bipartite_match_triton(metric, a_idx, b_idx)
    torch.testing.assert_close(s_tri, s_ref, rtol=1e-5, atol=1e-5)
    cosines = loop_cosines(metric, a_idx, b_idx)
    assert_same_matches(i_tri, i_ref, s_tri, cosines)
    # and both are right: each A token's best cosine over the B side, from a loop written here
    assert_best_matches(s_ref, i_ref, cosines)


@pytest.mark.parametrize("dim", [7, 64, 200, 1024])
def test_match_feature_dims(dim):
    """Keys (64), odd sizes and CLIP-L hidden states (1024) walk the feature dim in chunks."""
    torch.manual_seed(dim)
    metric = torch.randn(2, 41, dim)
    a_idx, b_idx = split(41, 1, 2, shuffled=True)
    s_ref, i_ref = bipartite_match_torch(metric, a_idx, b_idx)
    s_tri, i_tri = bipartite_match_triton(metric, a_idx, b_idx)
    torch.testing.assert_close(s_tri, s_ref, rtol=1e-5, atol=1e-5)
    assert_same_matches(i_tri, i_ref, s_tri, loop_cosines(metric, a_idx, b_idx))


def test_match_equals_naive_loops():
    torch.manual_seed(0)
    metric = torch.randn(2, 23, 16)
    a_idx, b_idx = split(23, 2, 2, shuffled=True)
    s_naive, i_naive = naive_match(metric, a_idx, b_idx)
    for fn in (bipartite_match_torch, bipartite_match_triton):
        s, i = fn(metric, a_idx, b_idx)
        torch.testing.assert_close(s, s_naive, rtol=1e-5, atol=1e-5)
        assert_same_matches(i, i_naive, s, loop_cosines(metric, a_idx, b_idx))


def random_plan(batch, n, n_keep, n_src, seed=0):
    g = torch.Generator().manual_seed(seed)
    keeps, srcs, dsts = [], [], []
    for _ in range(batch):
        perm = torch.randperm(n, generator=g)
        keeps.append(perm[:n_keep])
        srcs.append(perm[n_keep:n_keep + n_src])
        dsts.append(torch.randint(0, n_keep, (n_src,), generator=g))
    return torch.stack(keeps), torch.stack(srcs), torch.stack(dsts)


def naive_merge(x, size, keep, src, dst):
    out = torch.zeros(keep.shape[0], keep.shape[1], x.shape[-1])
    out_size = torch.zeros(keep.shape[0], keep.shape[1], 1)
    for b in range(keep.shape[0]):
        for k, t in enumerate(keep[b].tolist()):
            members = [t] + [s for s, d in zip(src[b].tolist(), dst[b].tolist()) if d == k]
            w = sum(float(size[b, m, 0]) for m in members)
            out[b, k] = sum(float(size[b, m, 0]) * x[b, m].float() for m in members) / w
            out_size[b, k, 0] = w
    return out, out_size


@pytest.mark.parametrize("batch,n", [(1, 2), (7, 3), (7, 61), (1, 197), (2, 257), (1, 577)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_triton_equals_torch_and_naive(batch, n, dtype):
    torch.manual_seed(n)
    x = torch.randn(batch, n, 48).to(dtype)
    size = torch.randint(1, 6, (batch, n, 1)).float()
    n_keep = max(1, n // 2)
    n_src = (n - n_keep) // 2 + (n - n_keep) % 2  # the rest of the tokens are pruned
    keep, src, dst = random_plan(batch, n, n_keep, n_src, seed=n)
    ref, ref_size, _ = merge_wavg_torch(x, size, keep, src, dst)
    out, out_size, _ = merge_wavg_triton(x, size, keep, src, dst)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(out_size, ref_size)
    if n <= 61:
        naive, naive_size = naive_merge(x, size, keep, src, dst)
        torch.testing.assert_close(out.float(), naive, rtol=tol, atol=tol)
        assert torch.equal(out_size, naive_size)
    # sizes are conserved: kept + merged = output total
    kept_total = size.gather(1, keep.unsqueeze(-1)).sum((1, 2)) + size.gather(1, src.unsqueeze(-1)).sum((1, 2))
    assert torch.equal(out_size.sum((1, 2)), kept_total)
    # deterministic: no order-dependent atomics
    again, _, _ = merge_wavg_triton(x, size, keep, src, dst)
    assert torch.equal(again, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_gather(dtype):
    x = torch.randn(3, 20, 8).to(dtype)
    keep = torch.stack([torch.randperm(20)[:7] for _ in range(3)])
    out, out_size, _ = merge_wavg_triton(x, torch.ones(3, 20, 1), keep, None, None)
    assert torch.equal(out, x.gather(1, keep.unsqueeze(-1).expand(-1, -1, 8)))
    assert torch.equal(out_size, torch.ones(3, 7, 1))


def test_training_gradients_flow_with_forced_triton(monkeypatch):
    """The kernel has no backward: with gradients on, the dispatcher must run the twin."""
    from tome_plus.triton_kernels.matching import merge_wavg
    keep, src, dst = random_plan(2, 30, 15, 8, seed=3)
    size = torch.randint(1, 4, (2, 30, 1)).float()
    grads = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("TOME_PLUS_KERNELS", mode)
        x = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out, _, _ = merge_wavg(x, size, keep, src, dst)
        assert out.requires_grad
        (out * torch.arange(16.0)).sum().backward()
        grads[mode] = x.grad
    torch.testing.assert_close(grads["triton"], grads["torch"])
    assert grads["torch"].abs().sum() > 0


def test_whole_vit_triton_equals_torch(monkeypatch):
    model = make("vit_tiny_patch16_224", depth=4)
    x = torch.randn(2, 3, 224, 224)
    outs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("TOME_PLUS_KERNELS", mode)
        tome_plus.patch(model, "tome", r=12, trace_source=True)
        with torch.no_grad():
            outs[mode] = (model(x), tome_plus.inspect(model).source)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs["triton"][1], outs["torch"][1])


def test_launch_errors():
    class NotInterpreted:  # what a kernel is when TRITON_INTERPRET was not set at import
        pass
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_launch(NotInterpreted(), torch.zeros(2))
    from tome_plus.triton_kernels.matching import _merge_kernel
    with pytest.raises(TypeError, match="float64"):
        check_launch(_merge_kernel, torch.zeros(2, dtype=torch.float64))
