"""Selection signals in float32, whatever precision the model runs in.

A method picks tokens by comparing scores (cosines, energies, PageRank mass, attention rows). In
fp16/bf16 those scores carry 3-8 significant bits fewer than in fp32, so near-equal scores order
differently and a half-precision model keeps other tokens than the same model in fp32. Autocast
makes it worse: it re-casts the float32 matmuls of a plan back to half. So the plan runs with
autocast off (`selection_precision`), every score is formed in float32 from the half inputs, and
the attention logits a method reads come from `fp32_logits`, which never makes a float32 copy of
a whole key tensor on CUDA (cuBLAS writes float32 from half inputs directly).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

HALF = (torch.float16, torch.bfloat16)


def selection_precision(device: torch.device) -> ContextManager:
    """Autocast off for the duration of a plan (a no-op context when autocast is not on)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def fp32_logits(q: torch.Tensor, k: torch.Tensor, scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`scale q k^T` in float32 (`[..., Nq, D] x [..., Nk, D] -> [..., Nq, Nk]`), autocast or not.

    float32 inputs take the exact path of the unpatched code, `(q * scale) @ k^T`, so fp32 models
    keep their bits; half inputs are multiplied with float32 accumulation and output. `out`: a
    contiguous float32 buffer of the result's shape to write to (reused across calls, so no fresh
    memory is page-faulted in per call on a CPU).
    """
    with selection_precision(q.device):
        if q.dtype not in HALF:
            return torch.matmul(q * scale, k.transpose(-2, -1), out=out)
        if q.is_cuda and _BMM_OUT_DTYPE:  # half in, float32 out: no float32 copy of k
            lead = q.shape[:-2]
            logits = torch.bmm(q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]).transpose(1, 2),
                               out_dtype=torch.float32).view(*lead, q.shape[-2], k.shape[-2]).mul_(scale)
            return logits if out is None else out.copy_(logits)
        return torch.matmul(q.float(), k.float().transpose(-2, -1), out=out).mul_(scale)


def _bmm_has_out_dtype() -> bool:
    """`torch.bmm(..., out_dtype=)` (half in, float32 out on CUDA) exists from torch 2.8 on."""
    try:
        return "out_dtype" in str(torch.ops.aten.bmm.dtype._schema)
    except (AttributeError, RuntimeError):
        return False


_BMM_OUT_DTYPE = _bmm_has_out_dtype()
