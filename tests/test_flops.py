"""FLOPs counting includes attention on CPU, with the same formula as on CUDA."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import tome_plus
from tome_plus.backends.timm_vit import cost_model
from tome_plus.tools.flops import count_flops, flop_counter

from conftest import make


def test_cpu_sdpa_counted_like_cuda_formula_and_like_math_path():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v)
    with flop_counter() as ours:
        F.scaled_dot_product_attention(q, k, v)
    cuda_formula = sdpa_flop_count(q.shape, k.shape, v.shape)
    assert ours.get_total_flops() == cuda_formula == 4 * 2 * 3 * 10 * 10 * 8
    # the unregistered CPU kernel is what this fixes: plain counting misses it on torch versions
    # where CPU SDPA runs a fused kernel; the math path (explicit matmuls) counts the same FLOPs
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as math_path:
        F.scaled_dot_product_attention(q, k, v)
    assert math_path.get_total_flops() == cuda_formula
    assert plain.get_total_flops() in (0, cuda_formula)


def test_model_count_equals_analytic_model_with_attention():
    model = make("vit_small_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    counted = count_flops(model, x)
    cost = cost_model(model)(197)
    assert counted == cost.total(197, [0] * 12)
    attention = 12 * 4 * 197 * 197 * 384
    assert counted - attention == cost.total(197, [0] * 12) - attention > 0


def test_patched_count_follows_schedule():
    model = make("vit_small_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    tome_plus.patch(model, "tome", r=8)
    counted = count_flops(model, x)
    removals = tome_plus.inspect(model).removals
    analytic = cost_model(model)(197).total(197, removals)
    # the counter also sees the matching's cosine-score matmul (A @ B^T on head-averaged keys)
    n, matching = 197, 0
    for r in removals:
        na, nb = (n - 1) // 2, (n - 1) - (n - 1) // 2
        matching += 2 * na * nb * 64 if r else 0
        n -= r
    assert counted == analytic + matching
