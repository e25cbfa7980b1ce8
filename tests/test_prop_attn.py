"""Proportional attention through one extra q/k channel (`tome_plus/prop_attn.py`): the same
logits as the additive mask, gradients to the original parameters, a weight cache that never
serves stale weights."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import tome_plus
from tome_plus import reduce
from tome_plus.backends import timm_vit
from tome_plus.backends.base import SCRATCH
from tome_plus.prop_attn import pad_qkv, padded_head_dim, split_padded, write_size_channel

from conftest import make


@pytest.mark.parametrize("head_dim,dp", [(64, 72), (32, 40), (7, 8), (8, 16)])
def test_padded_head_dim(head_dim, dp):
    assert padded_head_dim(head_dim) == dp


@pytest.mark.parametrize("bias", [True, False])
def test_extra_channel_equals_masked_attention(bias):
    g = torch.Generator().manual_seed(0)
    batch, n, heads, d, c = 2, 11, 3, 16, 24
    x = torch.randn(batch, n, c, generator=g)
    w = torch.randn(3 * heads * d, c, generator=g) / c ** 0.5
    b = torch.randn(3 * heads * d, generator=g) if bias else None
    size = torch.randint(1, 9, (batch, n), generator=g).float()
    scale = d ** -0.5
    # reference, written out: softmax(scale q k^T + log s_j) v per head
    q, k, v = F.linear(x, w, b).reshape(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = scale * q @ k.transpose(-2, -1) + size.log()[:, None, None, :]
    ref = logits.softmax(-1) @ v
    wp, bp = pad_qkv(w, b, heads, d)
    qp, kp, vp = split_padded(F.linear(x, wp, bp), heads, d)
    write_size_channel(kp, d, size.log() / scale)
    out = F.scaled_dot_product_attention(qp, kp, vp, scale=scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the unpadded channels are exactly the projection's q and k
    assert torch.equal(qp[..., :d], q) and torch.equal(kp[..., :d], k) and torch.equal(vp, v)


@pytest.fixture(autouse=True)
def channel_on_cpu(monkeypatch):
    """These tests are about the size channel: run it on CPU too, as CUDA does."""
    monkeypatch.setattr(reduce, "CHANNEL_DEVICES", frozenset({"cuda", "cpu"}))


def _run(model, x, train=False):
    if train:
        model.zero_grad()
        out = model(x)
        out.logsumexp(-1).sum().backward()
        return out.detach(), [p.grad.clone() for p in (model.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.bias)]
    with torch.no_grad():
        return model(x), None


@pytest.mark.parametrize("method,options", [("tome", {"r": 8}), ("pitome", {"keep": 0.8}),
                                            ("zero_tprune", {"flops": 0.7, "prop_attn": True})])
@pytest.mark.parametrize("train", [False, True])
def test_model_with_channel_equals_mask_path(method, options, train, monkeypatch, images):
    model = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(model, method, **options)
    out, grads = _run(model, images, train)
    monkeypatch.setattr(timm_vit, "SIZE_CHANNEL", False)
    ref, ref_grads = _run(model, images, train)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if train:
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_weight_cache_follows_the_parameters(images):
    model = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(model, "tome", r=8)
    model(images)
    assert SCRATCH in model.blocks[1].__dict__
    other = make("vit_tiny_patch16_224", depth=3)
    for p in other.parameters():
        p.mul_(1.5)
    model.load_state_dict(other.state_dict())  # in-place copies: new versions, same storage
    fresh = copy.deepcopy(other)
    tome_plus.patch(fresh, "tome", r=8)
    torch.testing.assert_close(model(images), fresh(images), rtol=0, atol=0)
    model.blocks[2].attn.qkv.bias.add_(0.3)
    fresh.blocks[2].attn.qkv.bias.add_(0.3)
    torch.testing.assert_close(model(images), fresh(images), rtol=0, atol=0)


@torch.no_grad()
def test_cache_is_not_pickled_and_unpatch_drops_it(images):
    model = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(model, "tome", r=8)
    ref = model(images)
    clone = pickle.loads(pickle.dumps(model))
    assert all(SCRATCH not in blk.__dict__ for blk in clone.blocks)
    assert torch.equal(clone(images), ref)
    tome_plus.unpatch(model)
    assert all(SCRATCH not in blk.__dict__ for blk in model.blocks)


@torch.no_grad()
def test_updates_that_bypass_the_version_counter(images):
    """`.data` writes (and fused optimizer steps) keep `_version`: a mode switch or `refresh` rebuilds."""
    model = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(model, "tome", r=8)
    model(images)
    fresh = copy.deepcopy(model)
    for m in (model, fresh):
        m.blocks[2].attn.qkv.weight.data.mul_(0.5)
    tome_plus.refresh(fresh)
    expected = fresh(images)
    model.train()
    model.eval()
    torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
    model.blocks[1].attn.qkv.bias.data.add_(1.0)
    tome_plus.refresh(model)
    fresh.blocks[1].attn.qkv.bias.data.add_(1.0)
    tome_plus.refresh(fresh)
    torch.testing.assert_close(model(images), fresh(images), rtol=0, atol=0)


def test_inference_mode_weights_and_cache(images):
    with torch.inference_mode():
        model = make("vit_tiny_patch16_224", depth=3)  # inference tensors: no version counter
        tome_plus.patch(model, "tome", r=8)
        out = model(images)
    ref = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(ref, "tome", r=8)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(images), rtol=0, atol=0)
    # a cache built under inference_mode must not be served to a forward that needs gradients
    ref.requires_grad_(False)
    with torch.inference_mode():
        ref(images)
    x = images.clone().requires_grad_(True)
    ref(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@torch.no_grad()
def test_layout_per_device(monkeypatch, images):
    """CPU runs proportional attention as the mask (faster there), CUDA as the size channel: the
    head dim SDPA sees tells which ran; the outputs agree."""
    monkeypatch.undo()  # the library's own setting, not the fixture's
    model = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(model, "tome", r=8)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.shape[-1], attn_mask is not None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cpu = model(images)
    assert seen[0] == (64, False) and set(seen[1:]) == {(64, True)}  # nothing merged before layer 0
    seen.clear()
    monkeypatch.setattr(reduce, "CHANNEL_DEVICES", frozenset({"cpu"}))  # as on CUDA
    channel = model(images)
    assert seen[0] == (64, False) and set(seen[1:]) == {(72, False)}
    torch.testing.assert_close(cpu, channel, rtol=1e-5, atol=1e-5)
