"""The kernel switch: TOME_PLUS_KERNELS=auto|triton|torch."""
import pytest
import torch

from tome_plus.triton_kernels import kernel_mode, use_triton


def test_modes(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("TOME_PLUS_KERNELS", raising=False)
    assert kernel_mode() == "auto" and use_triton(x) is False  # CPU tensors take the PyTorch twin
    monkeypatch.setenv("TOME_PLUS_KERNELS", "torch")
    assert use_triton(x) is False
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x) is True


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(2))


def test_bad_mode(monkeypatch):
    monkeypatch.setenv("TOME_PLUS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto"):
        kernel_mode()
