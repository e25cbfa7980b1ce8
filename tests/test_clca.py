"""CLCA head: the whole forward against a loop reference, its shape and parameters, every reducer,
gradients, save/load of the head alone, and removal."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import tome_plus
from tome_plus.heads.clca import ClcaConfig, schedule

from conftest import make
from naive import naive_bipartite_merge

SMALL = dict(img_size=64, num_classes=5)  # 16 patches: cheap, and every reducer still has room


def diffrate_schedule(depth=12, n=17):
    """A DiffRate schedule for `n` input tokens: prune in block 2, merge in block 5."""
    prune, merge, kept = [], [], n
    for layer in range(depth):
        if layer == 2:
            kept -= 3
        prune.append(kept)
        if layer == 5:
            kept -= 2
        merge.append(kept)
    return {"prune_kept_num": prune, "merge_kept_num": merge, "n_tokens": n}


REDUCERS = [("tome", {"r": 1}), ("pitome", {"r": 1}), ("zero_tprune", {"keep": [1, 0.8, 1, 0.8] + [1] * 8}),
            ("diffrate", {"schedule": diffrate_schedule()})]


def naive_clca_tome(model, head, image, r_per_layer):
    """ToMe + CLCA for one image, written from docs/methods.md (ToMe, CLCA head) with plain loops and
    explicit attention (`softmax(q k^T scale + log s)`)."""
    x = model._pos_embed(model.patch_embed(image[None]))[0]  # [N, C], class token first
    carrier = head.carrier[0, 0]
    x = torch.cat([x[:1], carrier[None], x[1:]])
    size = torch.ones(x.shape[0])
    n_prefix, cache, stacked = 2, [], []
    for layer, blk in enumerate(model.blocks):
        attn = blk.attn
        h = blk.norm1(x)
        n = h.shape[0]
        q, k, v = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
        logits = q @ k.transpose(-2, -1) * attn.scale + size.log()[None, None, :]
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
        x = x + blk.ls1(attn.proj(out))
        if r_per_layer[layer]:
            x, size, _ = naive_bipartite_merge(x, size, k.mean(0), r_per_layer[layer], n_prefix)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        if layer in head.append_at and cache:  # cached tokens join at the end, size 1 each
            x = torch.cat([x, torch.stack(cache)])
            size = torch.cat([size, torch.ones(len(cache))])
            cache = []
        if layer < head.append_at[-1]:
            cache += [x[n_prefix:].mean(0), x[1]]  # GAP of the reducible tokens, the carrier
        if layer in head.collect_at:
            stacked.append(x[0])
    return head.classifier(head.aggregate(torch.stack(stacked, -1)[None]))[0, :, 0]


def test_forward_matches_loop_reference():
    model = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(model, "tome", r=[3, 2, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0], head="clca")
    head = tome_plus.heads.module(model).eval()
    # BatchNorm statistics away from the identity, so the head's arithmetic is checked too
    for bn in (head.aggregate[0], head.aggregate[2]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    assert head.append_at == (0, 1, 3, 6, 10) and head.collect_at == (0, 1, 3, 6, 11)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        for b in range(2):
            ref = naive_clca_tome(model, head, images[b], tome_plus.inspect(model).removals)
            torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-4)


def test_parameter_count_is_the_formula():
    for expansion, classes in ((2, 5), (3, 7)):
        model = make("vit_small_patch16_224", img_size=64, num_classes=classes)
        tome_plus.patch(model, "tome", r=1, head="clca", head_options={"expansion": expansion})
        head = tome_plus.heads.module(model)
        c, k, e = model.embed_dim, len(head.collect_at), expansion
        expected = (c  # carrier
                    + 2 * c  # BatchNorm(C)
                    + e * c * k + e * c  # depth-wise Conv1d C -> eC, kernel K, groups C
                    + 2 * e * c  # BatchNorm(eC)
                    + e * c * classes + classes)  # point-wise Conv1d eC -> classes
        assert sum(p.numel() for p in head.parameters()) == expected
        assert head.aggregate[1].weight.shape == (e * c, 1, k)


def test_aggregation_head_alone_without_the_cache():
    model = make("vit_small_patch16_224", **SMALL)
    r = [3, 2, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0]
    tome_plus.patch(model, "tome", r=r, head="clca", head_options={"cache": False}, trace_source=True)
    head = tome_plus.heads.module(model).eval()
    torch.manual_seed(4)
    with torch.no_grad():  # every weight and statistic away from its initial value (BN starts as ~identity)
        for weight in head.parameters():
            weight.normal_(0.0, 0.5)
        for bn in (head.aggregate[0], head.aggregate[2]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    c, k = model.embed_dim, len(head.collect_at)
    assert head.carrier is None and head.append_at == ()
    assert sum(p.numel() for p in head.parameters()) == 2 * c + 2 * c * k + 2 * c + 4 * c + 2 * c * 5 + 5
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        with_head = tome_plus.inspect(model)
        # the tokens are the plain method's; the head aggregates its class tokens
        tome_plus.patch(model, "tome", r=r, trace_source=True)
        feats = model.forward_intermediates(images, indices=list(head.collect_at), norm=False,
                                            return_prefix_tokens=True, intermediates_only=True)
    assert with_head.tokens == tome_plus.inspect(model).tokens
    stacked = torch.stack([prefix[:, 0] for _, prefix in feats], dim=-1)  # [B, C, K] class tokens
    torch.testing.assert_close(out, aggregation_head_by_hand(head, stacked), rtol=1e-5, atol=1e-5)


def aggregation_head_by_hand(head, stacked):
    """The CLA head of the module docstring, from its parameters with plain ops, in float64:
    BatchNorm (eval), depth-wise Conv1d C -> 2C over the K stacked blocks, BatchNorm, GELU (erf),
    point-wise Conv1d to the classes."""
    bn1, conv, bn2, _ = head.aggregate
    p = lambda t: t.detach().double()

    def batch_norm(h, bn):  # h [B, C, L]
        scale = p(bn.weight) / (p(bn.running_var) + bn.eps).sqrt()
        return (h - p(bn.running_mean)[:, None]) * scale[:, None] + p(bn.bias)[:, None]

    h = batch_norm(p(stacked), bn1)
    c, k = h.shape[1], h.shape[2]
    per_input = conv.out_channels // c  # each input channel feeds `expansion` outputs, in order
    wide = torch.stack([(h[:, o // per_input] * p(conv.weight)[o, 0]).sum(-1) + p(conv.bias)[o]
                        for o in range(conv.out_channels)], dim=1)  # [B, 2C]: the kernel spans all K
    assert conv.weight.shape == (2 * c, 1, k)
    wide = batch_norm(wide[:, :, None], bn2)[:, :, 0]
    wide = 0.5 * wide * (1 + torch.erf(wide / 2 ** 0.5))
    logits = wide @ p(head.classifier.weight)[:, :, 0].T + p(head.classifier.bias)
    return logits.float()


def test_schedule_of_appends_and_stacked_tokens():
    # reduction blocks 3, 6, 9 of 12 (the paper's setting): append after 3, 6, 9 and depth - 2
    assert schedule(ClcaConfig(), [3, 6, 9], 12) == ((3, 6, 9, 10), (3, 6, 9, 11))
    assert schedule(ClcaConfig(recover_at_last=False), [3, 6, 9], 12) == ((3, 6, 9), (3, 6, 9, 11))
    assert schedule(ClcaConfig(layers=[2, 11]), [0, 1], 12) == ((2, 10), (2, 11))
    assert schedule(ClcaConfig(cache=False), [3, 6, 9], 12) == ((), (3, 6, 9, 11))
    with pytest.raises(ValueError, match="not blocks"):
        schedule(ClcaConfig(layers=[12]), [], 12)


@pytest.mark.parametrize("method,options", REDUCERS, ids=[m for m, _ in REDUCERS])
def test_every_reducer_counts_sizes_and_gradients(method, options):
    model = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(model, method, head="clca", trace_source=True, **options)
    head = tome_plus.heads.module(model)
    model.train()
    torch.manual_seed(2)
    images = torch.randn(4, 3, 64, 64)
    out = model(images)
    assert out.shape == (4, 5)
    info = tome_plus.inspect(model)
    # tokens: the schedule's removals plus the carrier and every appended cached token
    n, expected, cached, appended = 17 + 1, [], 0, 0
    for layer, r in enumerate(info.removals):
        n -= r
        if layer in head.append_at:
            n, appended, cached = n + cached, appended + cached, 0
        if layer < head.append_at[-1]:
            cached += 2
        expected.append(n)
    assert list(info.tokens) == expected and appended > 0
    if method in ("tome", "pitome"):  # pure merging: sizes add up to the input, carrier and appended tokens
        assert torch.allclose(info.size.sum(dim=(1, 2)), torch.full((4,), 17.0 + 1 + appended))
        assert (info.source >= 0).all()
    # the carrier is protected: position 1, never merged or pruned
    assert torch.all(info.size[:, 1] == 1)
    # no input patch ever lands on the carrier
    assert info.source[:, 1].sum() == 0
    F.cross_entropy(out, torch.arange(4) % 5).backward()
    assert head.carrier.grad is not None and head.carrier.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_appended_tokens_have_size_one_under_proportional_attention():
    model = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(model, "tome", r=[3, 0, 0, 2] + [0] * 8, head="clca",
                    head_options={"layers": [3], "protect_cached": True, "recover_at_last": False})
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    info = tome_plus.inspect(model)
    # blocks 0-2 cached 6 tokens, appended after block 3 right after the carrier, all of size 1,
    # while merged patches are larger
    assert info.tokens[3] == 18 - 3 - 2 + 6
    assert torch.all(info.size[:, 2:8] == 1)
    assert info.size[:, 8:].max() > 1
    assert torch.allclose(info.size.sum(dim=(1, 2)), torch.full((2,), 17.0 + 1 + 6))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = make("vit_small_patch16_224", **SMALL)
        tome_plus.patch(model, "tome", r=1, head="clca")
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(2)
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        grads.append(tome_plus.heads.module(model).carrier.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_head_follows_train_and_eval_and_takes_batch_one():
    model = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(model, "tome", r=1, head="clca")
    head = tome_plus.heads.module(model)
    assert not head.training  # patched in eval mode, as the model was
    model.train()
    assert head.training and head.aggregate[0].training
    model(torch.randn(2, 3, 64, 64))
    assert head.aggregate[0].num_batches_tracked == 1
    model.eval()
    with torch.no_grad():
        one = model(torch.randn(1, 3, 64, 64))
    assert one.shape == (1, 5) and head.aggregate[0].num_batches_tracked == 1


def test_carrier_starts_as_the_class_token_entering_the_blocks():
    for kwargs in ({}, {"pre_norm": True}, {"no_embed_class": True}):
        model = make("vit_small_patch16_224", **SMALL, **kwargs)
        with torch.no_grad():
            model.cls_token.normal_()
            entering = model.norm_pre(model._pos_embed(model.patch_embed(torch.randn(1, 3, 64, 64))))[0, 0]
        tome_plus.patch(model, "tome", r=1, head="clca")
        torch.testing.assert_close(tome_plus.heads.module(model).carrier[0, 0], entering)


def test_forward_features_then_forward_head():
    model = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(model, "pitome", r=1, head="clca")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        feats = model.forward_features(images)
        torch.testing.assert_close(model.forward_head(feats), out)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 2 * model.embed_dim)
        with pytest.raises(ValueError, match="forward_features returned"):
            model.forward_head(feats.clone())


def test_head_weights_save_and_load_alone(tmp_path):
    model = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(model, "tome", r=1, head="clca")
    head = tome_plus.heads.module(model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "clca.pt"
    tome_plus.heads.save(model, str(path))
    other = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(other, "tome", r=1, head="clca", head_options={"weights": str(path)})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(images), model(images))
    fresh = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(fresh, "tome", r=1, head="clca")
    tome_plus.heads.load(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images))
    # the file holds the head only
    assert all(k.startswith(("carrier", "aggregate", "classifier")) for k in torch.load(path)["state_dict"])
    with pytest.raises(ValueError, match="trained with"):  # same shapes, another computation
        tome_plus.patch(make("vit_small_patch16_224", **SMALL), "tome", r=1, head="clca",
                        head_options={"weights": str(path), "protect_cached": True})
    mismatched = make("vit_small_patch16_224", **SMALL)
    with pytest.raises(ValueError, match="trained with"):
        tome_plus.patch(mismatched, "tome", r=[2] + [0] * 11, head="clca", head_options={"weights": str(path)})
    assert tome_plus.heads.name_of(mismatched) is None  # a failed patch changes nothing


def test_unpatch_restores_the_model_exactly():
    model = make("vit_small_patch16_224", **SMALL)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    tome_plus.patch(model, "zero_tprune", keep=0.8, head="clca")
    assert any(k.startswith("tome_plus_head.") for k in model.state_dict())
    with torch.no_grad():
        model(images)
    tome_plus.unpatch(model)
    assert not hasattr(model, "tome_plus_head") and list(model.state_dict()) == keys
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    # re-patching without a head drops the head too
    tome_plus.patch(model, "tome", r=1, head="clca")
    tome_plus.patch(model, "tome", r=1)
    assert not hasattr(model, "tome_plus_head") and tome_plus.inspect(model).head is None


def test_pickle_and_deepcopy_keep_the_head():
    model = make("vit_small_patch16_224", **SMALL)
    tome_plus.patch(model, "tome", r=1, head="clca")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert tome_plus.heads.module(twin) is twin.tome_plus_head
            torch.testing.assert_close(twin(images), out)


def test_prefix_tokens_and_registers():
    # distillation token and registers stay protected prefix tokens; the carrier comes after them
    for name, kwargs, n_prefix in (("deit_small_distilled_patch16_224", {}, 2),
                                   ("vit_small_patch14_reg4_dinov2", {}, 5)):
        model = make(name, img_size=56, num_classes=3, **kwargs)
        tome_plus.patch(model, "tome", r=1, head="clca", trace_source=True)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 56, 56))
        assert out.shape == (2, 3)
        info = tome_plus.inspect(model)
        assert torch.all(info.size[:, :n_prefix + 1] == 1)
        for i in range(n_prefix):  # prefix token i holds input token i alone
            assert torch.all(info.source[:, i, i] == 1) and torch.all(info.source[:, i].sum(-1) == 1)


def test_errors():
    model = make("vit_small_patch16_224", **SMALL)
    with pytest.raises(ValueError, match="unknown head"):
        tome_plus.patch(model, "tome", head="nope")
    with pytest.raises(TypeError, match="valid options"):
        tome_plus.patch(model, "tome", head="clca", head_options={"kernel": 3})
    with pytest.raises(TypeError, match="need a head"):
        tome_plus.patch(model, "tome", head_options={"expansion": 2})
    with pytest.raises(ValueError, match="num_classes"):
        tome_plus.patch(model, "tome", head="clca", head_options={"num_classes": 0})
    with pytest.raises(FileNotFoundError):
        tome_plus.patch(model, "tome", head="clca", head_options={"weights": "/nonexistent.pt"})
    backbone = make("vit_small_patch16_224", img_size=64, num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        tome_plus.patch(backbone, "tome", head="clca")
    tome_plus.patch(backbone, "tome", head="clca", head_options={"num_classes": 4})
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    no_cls = make("vit_small_patch16_224", img_size=64, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        tome_plus.patch(no_cls, "tome", head="clca")
    assert tome_plus.heads.name_of(no_cls) is None


@torch.no_grad()
def test_torch_compile_without_graph_breaks():
    torch._dynamo.reset()
    model = make("vit_tiny_patch16_224", depth=4, **SMALL)
    tome_plus.patch(model, "tome", r=[2, 0, 2, 0], head="clca")
    x = torch.randn(2, 3, 64, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
