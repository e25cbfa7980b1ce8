"""FLOPs with `torch.utils.flop_counter`, attention included on every device.

The flop counter knows the CUDA SDPA kernels (flash, efficient, cuDNN) but not the CPU one,
`aten._scaled_dot_product_flash_attention_for_cpu`, so on CPU it counts zero FLOPs for attention.
We map the CPU op (and its backward) to the same formulas torch uses for the CUDA kernels, so a
count on CPU equals the count on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FORMULAS = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CPU_SDPA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    CPU_SDPA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=dict(CPU_SDPA_FORMULAS))


@torch.no_grad()
def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs (multiply-add = 2) of one forward of `model` on `x`."""
    with flop_counter() as counter:
        model(x)
    return counter.get_total_flops()
