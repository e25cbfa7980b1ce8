"""Kernel dispatch (installed as `tome_plus.triton_kernels`).

One switch picks the implementation of every hot-path op: Triton on CUDA tensors, the PyTorch
twin elsewhere. `TOME_PLUS_KERNELS=triton|torch|auto` (default auto) forces one for tests and
benchmarks; a forced `triton` on CPU tensors needs the Triton interpreter (`TRITON_INTERPRET=1`).
"""
from __future__ import annotations

import os

import torch

MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("TOME_PLUS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"TOME_PLUS_KERNELS={mode!r}; expected one of {MODES}")
    return mode


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_launch(kernel, *tensors: torch.Tensor) -> None:
    """Clear errors before a Triton launch: CPU tensors need the interpreter, dtypes must be supported.

    Triton decides at import time (when `@triton.jit` runs) whether kernels are interpreted, so
    `TRITON_INTERPRET=1` must be set before `tome_plus` is imported.
    """
    for t in tensors:
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Triton kernels take {SUPPORTED_DTYPES}, got {t.dtype}")
    if not tensors[0].is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels on CPU tensors run only in the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before importing tome_plus (or use CUDA tensors)")


def use_triton(x: torch.Tensor) -> bool:
    """Whether ops on `x` should run their Triton kernel."""
    mode = kernel_mode()
    if mode == "torch" or torch.jit.is_tracing():
        # a Triton launch bypasses the dispatcher: a trace would record its outputs as empty tensors
        return False
    if mode == "auto":
        return x.is_cuda
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("TOME_PLUS_KERNELS=triton on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 (before importing triton)")
    return True
