"""The timm backend on every ViT variant we support: identity at zero budget, invariants of the
reduced tokens, unpatch, training, checkpointing, compile, dtypes, intermediates."""
import warnings

import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

import tome_plus
from tome_plus.backends.base import get_info

from conftest import make

VARIANTS = {
    "cls": ("vit_small_patch16_224", {}),
    "avgpool_no_cls": ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "distilled": ("deit_small_distilled_patch16_224", {}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    "layerscale": ("deit3_small_patch16_224", {}),
    "dinov2": ("vit_small_patch14_dinov2", {"img_size": 224}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
}


def variant(name):
    model_name, kwargs = VARIANTS[name]
    return make(model_name, **kwargs)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_zero_budget_is_identity(name, images):
    model = variant(name)
    ref = model(images)
    ref_feats = model.forward_features(images)
    tome_plus.patch(model, "tome", r=0)
    assert torch.equal(model(images), ref)
    assert torch.equal(model.forward_features(images), ref_feats)
    assert torch.equal(model.forward_head(ref_feats), ref)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_invariants_of_reduced_tokens(name, images):
    model = variant(name)
    p = model.num_prefix_tokens
    feats_in = model.patch_embed(images)
    n0 = feats_in.shape[1] * (feats_in.shape[2] if feats_in.ndim == 4 else 1) + p
    r = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tome_plus.patch(model, "tome", r=r, trace_source=True)
    out = model(images)
    assert torch.isfinite(out).all()
    info = tome_plus.inspect(model)

    # tokens per layer follow the schedule, computed here from docs/methods.md (ToMe, step 1)
    expected, n = [], n0
    for _ in model.blocks:
        n -= min(r, (n - p) // 2)
        expected.append(n)
    assert list(info.tokens) == expected
    assert info.input_tokens == n0

    # sizes sum to the input count; source map consistent with sizes; prefix untouched and first
    assert torch.equal(info.size.sum(dim=(1, 2)), torch.full((2,), float(n0)))
    assert torch.equal(info.source.sum(-1, keepdim=True), info.size)
    assert torch.equal(info.source.sum(1), torch.ones(2, n0))  # every input token held exactly once
    eye = torch.eye(n0)[:p]
    assert torch.equal(info.source[:, :p], eye.expand(2, -1, -1))


@pytest.mark.parametrize("name", ["cls", "distilled", "registers"])
@torch.no_grad()
def test_unpatch_restores_classes_and_outputs(name, images):
    model = variant(name)
    classes = {n: type(m) for n, m in model.named_modules()}
    ref = model(images)
    keys = list(model.state_dict())
    tome_plus.patch(model, "tome", r=4)
    assert list(model.state_dict()) == keys
    assert isinstance(model, VisionTransformer) and isinstance(model.blocks[0], Block)
    assert not torch.allclose(model(images), ref)
    tome_plus.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not hasattr(model, "_tome_plus")
    assert torch.equal(model(images), ref)
    tome_plus.unpatch(model)  # no-op on an unpatched model


@torch.no_grad()
def test_repatch_replaces_method():
    model = variant("cls")
    tome_plus.patch(model, "tome", r=4)
    tome_plus.patch(model, "tome", r=2)
    assert get_info(model).config.r == 2
    assert type(model).__mro__.count(VisionTransformer) == 1  # not wrapped twice
    tome_plus.unpatch(model)
    assert type(model) is VisionTransformer


def test_training_gradients_reach_weights_through_merges(images):
    model = variant("layerscale").train()
    tome_plus.patch(model, "tome", r=8)
    model(images).logsumexp(-1).sum().backward()
    for blk in (model.blocks[0], model.blocks[-1]):
        assert blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0
        assert blk.mlp.fc2.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad.abs().sum() > 0


def test_grad_checkpointing_gives_same_gradients(images):
    grads = []
    for ckpt in (False, True):
        model = variant("cls").train()
        tome_plus.patch(model, "tome", r=8)
        model.set_grad_checkpointing(ckpt)
        loss = model(images).logsumexp(-1).sum()
        loss.backward()
        grads.append((loss.detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@torch.no_grad()
def test_torch_compile_runs_and_agrees():
    torch._dynamo.reset()
    model = make("vit_tiny_patch16_224", depth=3)
    x = torch.randn(2, 3, 224, 224)
    tome_plus.patch(model, "tome", r=8, trace_source=True)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)  # no graph breaks
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
    assert tome_plus.inspect(model).tokens == (189, 181, 173)


@pytest.mark.parametrize("size", [(160, 224), (288, 288)])
@torch.no_grad()
def test_dynamic_img_size(size):
    model = make("vit_small_patch16_224", dynamic_img_size=True)
    x = torch.randn(1, 3, *size)
    ref = model(x)
    tome_plus.patch(model, "tome", r=0)
    assert torch.equal(model(x), ref)
    tome_plus.patch(model, "tome", r=6)
    model(x)
    n0 = (size[0] // 16) * (size[1] // 16) + 1
    assert tome_plus.inspect(model).input_tokens == n0
    assert tome_plus.inspect(model).tokens[0] == n0 - 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision(dtype, images):
    model = variant("cls")
    tome_plus.patch(model, "tome", r=8)
    ref = model(images)
    model = model.to(dtype)
    out = model(images.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert tome_plus.inspect(model).tokens[-1] == 197 - 8 * 12
    # same merges up to rounding: logits stay close to fp32
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@torch.no_grad()
def test_batch_size_one_equals_batched(images):
    model = variant("cls")
    tome_plus.patch(model, "tome", r=12)
    batched = model(images)
    single = torch.cat([model(images[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_weighted_average_pool():
    model = variant("avgpool_no_cls")
    x = torch.randn(2, 3, 224, 224)
    tome_plus.patch(model, "tome", r=8, trace_source=True)
    feats = model.forward_features(x)
    size = tome_plus.inspect(model).size
    pooled = model.forward_head(feats, pre_logits=True)
    # a size-weighted mean of merged tokens equals the mean over the un-merged patches
    expected = (feats * size).sum(1) / size.sum(1)
    torch.testing.assert_close(pooled, model.fc_norm(expected))
    tome_plus.patch(model, "tome", r=8, weighted_pool=False)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), model.fc_norm(feats.mean(1)))


@torch.no_grad()
def test_forward_head_pools_with_the_sizes_of_its_own_features():
    model = variant("avgpool_no_cls")
    tome_plus.patch(model, "tome", r=8)
    a, b = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)
    feats_a = model.forward_features(a)
    head_a = model.forward_head(feats_a)
    model.forward_features(b)  # another forward in between must not change how feats_a pools
    torch.testing.assert_close(model.forward_head(feats_a), head_a, rtol=0, atol=0)
    torch.testing.assert_close(model(a), head_a)
    # a tensor that is not forward_features' output pools as timm does (plain mean)
    copy = feats_a.clone()
    torch.testing.assert_close(model.forward_head(copy, pre_logits=True), model.fc_norm(copy.mean(1)))


@pytest.mark.parametrize("name", ["cls", "registers"])
@torch.no_grad()
def test_forward_intermediates_unmerge_onto_grid(name, images):
    model = variant(name)
    ref_final, ref_inter = model.forward_intermediates(images, indices=3)
    tome_plus.patch(model, "tome", r=0)
    final, inter = model.forward_intermediates(images, indices=3)
    assert torch.equal(final, ref_final) and all(torch.equal(a, b) for a, b in zip(inter, ref_inter))

    tome_plus.patch(model, "tome", r=8, trace_source=True)
    final, inter = model.forward_intermediates(images, indices=[len(model.blocks) - 1], norm=True)
    assert [t.shape for t in inter] == [ref_inter[-1].shape]
    feats = model.forward_features(images)
    torch.testing.assert_close(final, feats)
    # every patch carries the value of the token that holds it
    source = tome_plus.inspect(model).source
    p = model.num_prefix_tokens
    grid = inter[0].flatten(2).transpose(1, 2)  # [B, HW, C]
    holder = source[:, :, p:].argmax(1)  # [B, HW]
    expected = feats.gather(1, holder.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
    torch.testing.assert_close(grid, expected)
    nlc = model.forward_intermediates(images, indices=1, output_fmt="NLC", intermediates_only=True,
                                      norm=True, return_prefix_tokens=True)
    torch.testing.assert_close(nlc[0][0], expected)
    assert nlc[0][1].shape == (2, p, feats.shape[-1])


@torch.no_grad()
def test_deepcopy_of_patched_model_is_independent(images):
    import copy
    model = variant("cls")
    ref = model(images)
    tome_plus.patch(model, "tome", r=8)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(images), model(images))
    tome_plus.unpatch(twin)
    assert type(twin) is VisionTransformer and type(twin.blocks[0]) is Block
    assert type(model) is not VisionTransformer  # the original stays patched
    assert torch.equal(twin(images), ref)


def test_class_attention_signal(images):
    """A method asking for `cls_attn` gets the class token's softmax row; no class token is an
    error at `patch` (not in the middle of inference), and leaves the model unpatched."""
    from tome_plus.merging import Plan
    from tome_plus.methods.base import REGISTRY, Reducer, register

    seen = []

    class ClsProbe(Reducer):
        name = "_test_cls_probe"
        needs = frozenset({"cls_attn"})

        def max_remove(self, layer, n_tokens, n_prefix):
            return n_tokens - n_prefix

        def plan(self, signals, state, n_remove):
            seen.append(signals["cls_attn"])
            keep = torch.arange(signals["cls_attn"].shape[-1] - n_remove).expand(signals["cls_attn"].shape[0], -1)
            return Plan(keep=keep)

    register(ClsProbe)
    try:
        model = make("vit_tiny_patch16_224", depth=2)
        tome_plus.patch(model, "_test_cls_probe", r=[4])
        with torch.no_grad():
            model(images)
        cls_row = seen[0]
        assert cls_row.shape == (2, 3, 197)
        # reference: the class token's softmax row of block 0, written out
        with torch.no_grad():
            blk = model.blocks[0]
            h = blk.norm1(model.norm_pre(model._pos_embed(model.patch_embed(images))))
            q, k, _ = blk.attn.qkv(h).reshape(2, 197, 3, 3, -1).permute(2, 0, 3, 1, 4)
            ref = ((q[:, :, :1] @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1)[:, :, 0]
        torch.testing.assert_close(cls_row, ref, rtol=1e-5, atol=1e-6)
        no_cls = make("vit_tiny_patch16_224", depth=2, class_token=False, global_pool="avg")
        with pytest.raises(ValueError, match="no class token"):
            tome_plus.patch(no_cls, "_test_cls_probe", r=[4])
        assert get_info(no_cls) is None
    finally:
        REGISTRY.unregister("_test_cls_probe")
