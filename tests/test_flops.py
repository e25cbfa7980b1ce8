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


def vit_flops(width: int, depth: int, tokens: int, patch_inputs: int, classes: int) -> int:
    """An unpatched timm ViT's FLOPs (multiply-add = 2) written out layer by layer: the patch
    embedding on the patches; per block qkv, Q K^T and attn V, the projection and the two MLP
    layers (hidden 4 x width) on every token; the classifier on the class token."""
    c, n = width, tokens
    block = 2 * n * c * 3 * c + 2 * 2 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * 4 * c
    return 2 * (n - 1) * patch_inputs * c + depth * block + 2 * c * classes


def plain_math_flops(model, x) -> int:
    """torch's own counter, without our CPU formula: attention runs as explicit matmuls (math path)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as plain, torch.no_grad():
        model(x)
    return plain.get_total_flops()


def test_model_count_equals_hand_count_and_plain_counter_on_math_attention():
    model = make("vit_small_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    counted = count_flops(model, x)
    assert counted == vit_flops(384, 12, 197, patch_inputs=3 * 16 * 16, classes=1000)
    assert counted == plain_math_flops(model, x)
    assert counted == cost_model(model)(197).total(197, [0] * 12)  # the solver's analytic model agrees


def test_patched_count_follows_schedule():
    model = make("vit_small_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    tome_plus.patch(model, "tome", r=8)
    with flop_counter() as counter, torch.no_grad():
        model(x)
    assert list(tome_plus.inspect(model).removals) == [8] * 12
    # the MLPs run on the n - r tokens each block keeps: by hand, layer by layer (attention and the
    # matching's products depend on how the method computes them: checked in the total below)
    per_module = {name.split(".", 1)[-1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    n, c = 197, 384
    for i in range(12):
        assert per_module[f"blocks.{i}.mlp.fc1"] == per_module[f"blocks.{i}.mlp.fc2"] == 2 * (n - 8) * c * 4 * c
        n -= 8
    assert counter.get_total_flops() == count_flops(model, x) == plain_math_flops(model, x)
