"""The patched forward's cost on a GPU is mostly launches and host syncs; both are counted here on CPU.

Launches: Triton kernels (run by the interpreter, counted at `InterpretedFunction.run`) plus the
PyTorch ops that would launch a kernel (seen by a dispatch mode; views, metadata and allocations
excluded). The count of a patched forward minus the unpatched one, per reducing layer, must stay
within issue 9's budget: 4 for `tome`, 6 for `pitome`. Host syncs (`.item()`, `nonzero`, ...)
must not happen at all: a CUDA graph could not capture the forward.
"""
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction

import tome_plus
import tome_plus.reduce  # monkeypatched below; not imported by `import tome_plus`

from conftest import make

aten = torch.ops.aten
NO_LAUNCH = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.detach.default, aten.lift_fresh.default, aten.alias.default}
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
         aten.equal.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
         aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.item.default}


class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.paused = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            if func in SYNCS:
                self.syncs.append(str(func))
            elif not func.is_view and func not in NO_LAUNCH:
                self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def count_launches(monkeypatch):
    mode = Launches()
    # count the layout a GPU runs: proportional attention as the size channel
    monkeypatch.setattr(tome_plus.reduce, "CHANNEL_DEVICES", frozenset({"cuda", "cpu"}))
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):  # the interpreter's own host copies are not launches
        mode.ops.append(f"triton:{self.fn.__name__}")
        mode.paused = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.paused = False

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def one_attention(*args, **kwargs):
        # one fused kernel on a GPU; the CPU may decompose it (the padded head dim takes the math
        # path here), which is not what a GPU launches. The GPU kernels write their output as
        # [B, N, H, D] in memory (so merging the heads afterwards is a view); the math path writes
        # [B, H, N, D], whose head merge would be a copy no GPU makes: give the GPU's layout.
        mode.ops.append("sdpa")
        mode.paused = True
        try:
            return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
        finally:
            mode.paused = False

    # undone on exit, not at the test's end: a later count must not feed this one's counters
    with monkeypatch.context() as patched:
        patched.setattr(InterpretedFunction, "run", counted)
        patched.setattr(torch.nn.functional, "scaled_dot_product_attention", one_attention)
        with mode:
            yield mode


def launches(model, x, monkeypatch):
    """Launches of the second forward: the first builds per-model caches (padded qkv weights)."""
    with torch.no_grad():
        model(x)
        with count_launches(monkeypatch) as mode:
            model(x)
    return mode


@pytest.mark.parametrize("method,options,budget", [
    ("tome", {"r": 4}, 4),
    ("pitome", {"keep": 0.9}, 6),
    ("pitome", {"keep": 0.9, "preset": "deit_code", "prop_attn": True}, 6),
])
def test_launches_per_reducing_layer(method, options, budget, monkeypatch):
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    model = make("vit_tiny_patch16_224", depth=4, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    base = launches(model, x, monkeypatch)
    tome_plus.patch(model, method, **options)
    patched = launches(model, x, monkeypatch)
    reducing = sum(1 for r in tome_plus.inspect(model).removals if r > 0)
    assert reducing == 4
    extra = len(patched.ops) - len(base.ops)
    assert extra <= budget * reducing, (extra, sorted(set(patched.ops) - set(base.ops)), patched.ops)
    # and the fused kernels are what runs: one plan and one merge launch per reducing layer
    assert patched.ops.count("triton:_plan_kernel") == reducing
    assert patched.ops.count("triton:_merge_kernel") == reducing


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("method,options", [
    ("tome", {"r": 4, "trace_source": True}), ("pitome", {"keep": 0.8}),
    ("pitome", {"keep": 0.8, "preset": "deit_code"}), ("zero_tprune", {"flops": 0.6}),
    ("zero_tprune", {"flops": 0.6, "prop_attn": True, "layers": [1, 2]}),
])
def test_no_host_sync_in_the_forward(method, options, kernels, monkeypatch):
    monkeypatch.setenv("TOME_PLUS_KERNELS", kernels)
    model = make("vit_tiny_patch16_224", depth=4, img_size=96)
    tome_plus.patch(model, method, **options)
    mode = launches(model, torch.randn(2, 3, 96, 96), monkeypatch)
    assert mode.syncs == []


def test_sync_detector_sees_item(monkeypatch):
    """The detector itself: `.item()` and `nonzero` are caught."""
    with count_launches(monkeypatch) as mode:
        t = torch.ones(3)
        t.sum().item()
        t.nonzero()
    assert len(mode.syncs) == 2


@pytest.mark.parametrize("method,options", [("tome", {"r": 4}), ("zero_tprune", {"keep": 0.8})])
def test_clca_head_launches_and_no_host_sync(method, options, monkeypatch):
    """The CLCA head over the same reducer: one mean per caching block, one copy per append (three
    with sizes) and a small head; never a host sync."""
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    model = make("vit_tiny_patch16_224", depth=4, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    tome_plus.patch(model, method, **options)
    plain = launches(model, x, monkeypatch)
    tome_plus.patch(model, method, head="clca", **options)
    head = tome_plus.heads.module(model)
    clca = launches(model, x, monkeypatch)
    assert clca.syncs == []
    caching = sum(1 for layer in range(4) if layer < head.append_at[-1])
    extra = len(clca.ops) - len(plain.ops)
    # per caching block one mean; per append one copy of x (+ sizes and log-sizes once something
    # merged); the carrier's insertion; the head's 6 ops less the final norm and linear head
    assert extra <= caching + 3 * len(head.append_at) + 1 + 4, (extra, clca.ops)
