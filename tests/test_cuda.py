"""On a GPU: every Triton kernel on CUDA tensors against its PyTorch twin, and a patched model on CUDA
against the same model on CPU. Skipped without CUDA. A GPU session runs it as

    TOME_PLUS_TEST_CUDA=1 python -m pytest -q tests/test_cuda.py

(`TOME_PLUS_TEST_CUDA` keeps conftest from switching Triton to its CPU interpreter.) The interpreter
runs programs one after another, so what only real hardware shows (barriers, shared scratch,
launch configurations) is checked here."""
import os

import pytest
import torch

import tome_plus

from conftest import make

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and TOME_PLUS_TEST_CUDA=1")


@pytest.mark.parametrize("n,heads,r", [(197, 12, 16), (577, 16, 12), (50, 3, 20)])
def test_plan_and_merge_kernels(n, heads, r):
    from tome_plus.merging import Plan, merge_wavg
    from tome_plus.triton_kernels import plan as P
    from tome_plus.triton_kernels.matching import merge_wavg_torch
    k = torch.randn(8, n, 3, heads, 64, device="cuda", dtype=torch.float16).permute(2, 0, 3, 1, 4)[1]
    kernel, twin = P.bipartite_plan_triton(k, r, 1), P.bipartite_plan_torch(k, r, 1)
    assert torch.equal(kernel.keep, twin.keep) and torch.equal(kernel.src, twin.src)
    assert torch.equal(kernel.dst, twin.dst)
    x = torch.randn(8, n, 768, device="cuda", dtype=torch.float16)
    size = torch.randint(1, 5, (8, n, 1), device="cuda").float()
    plan = Plan(keep=kernel.keep, src=kernel.src, dst=kernel.dst, csr=kernel.csr)
    out, out_size, log = merge_wavg(plan, x, size, 8.0)
    ref, ref_size, ref_log = merge_wavg_torch(x, size, plan.keep, plan.src, plan.dst, log_scale=8.0)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert torch.equal(out_size, ref_size)
    torch.testing.assert_close(log, ref_log)


@pytest.mark.parametrize("n", [197, 577])
@pytest.mark.parametrize("masked", [False, True])
def test_pagerank_kernel(n, masked):
    from tome_plus.triton_kernels.pagerank import weighted_pagerank_torch, weighted_pagerank_triton
    attn = torch.randn(16, 12, n, n, device="cuda").softmax(-1).half()
    alive = (torch.rand(16, n, device="cuda") > 0.3) if masked else None
    if alive is not None:
        alive[:, 0] = True
    for iters in (1, 5, 30):
        s, var = weighted_pagerank_triton(attn, iters, alive)
        s_ref, var_ref = weighted_pagerank_torch(attn, iters, alive)
        torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method,options", [("tome", {"r": 16}), ("pitome", {"keep": 0.9}),
                                            ("zero_tprune", {"flops": 0.6})])
@torch.no_grad()
def test_patched_model_on_cuda_equals_cpu(method, options):
    model = make("vit_small_patch16_224")
    tome_plus.patch(model, method, **options)
    x = torch.randn(4, 3, 224, 224)
    ref = model(x)
    out = model.cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
