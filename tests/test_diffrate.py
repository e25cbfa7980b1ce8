"""DiffRate inference: the published schedules, exactly, and the authors' merge against a loop reference."""
import json
import math

import pytest
import torch

import tome_plus
from tome_plus.methods.diffrate import kept_counts, presets

from conftest import make

PRESETS = [(name, key) for name, table in presets().items() for key in table]
# a cheap model with the preset model's depth and token count (the counts depend on nothing else)
STAND_IN = {12: ({}, 197), 24: ({"depth": 24}, 197), 32: ({"depth": 32, "img_size": 256}, 257)}


def running_min(schedule, n):
    out = []
    for p, m in zip(schedule["prune_kept_num"], schedule["merge_kept_num"]):
        n = min(p, m, n)
        out.append(n)
    return out


@pytest.mark.parametrize("name,key", PRESETS)
def test_every_preset_gives_its_counts(name, key):
    schedule = presets()[name][key]
    kwargs, n0 = STAND_IN[len(schedule["prune_kept_num"])]
    model = make("vit_tiny_patch16_224", **kwargs)
    tome_plus.patch(model, "diffrate", schedule=schedule)
    with torch.no_grad():
        model(torch.randn(1, 3, kwargs.get("img_size", 224), kwargs.get("img_size", 224)))
    info = tome_plus.inspect(model)
    assert info.input_tokens == n0
    assert list(info.tokens) == running_min(schedule, n0)


def test_preset_by_name_gflops_and_flops_fraction():
    model = make("deit_small_patch16_224")
    tome_plus.patch(model, "diffrate", gflops=2.9)
    expected = running_min(presets()["deit_small_patch16_224"]["2.9"], 197)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert list(tome_plus.inspect(model).tokens) == expected
    tome_plus.patch(model, "diffrate", flops=2.9 / 4.6)  # DeiT-S: 4.6 GFLOPs
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert list(tome_plus.inspect(model).tokens) == expected


def naive_diffrate(model, images, schedule, mode="mean"):
    """The authors' inference algorithm written out with loops over tokens, on timm blocks."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    outs, sizes = [], []
    for b in range(x.shape[0]):
        tokens = x[b]
        size = torch.ones(tokens.shape[0])
        for layer, blk in enumerate(model.blocks):
            h = blk.norm1(tokens)
            attn = blk.attn
            n, heads = h.shape[0], attn.num_heads
            q, k, v = attn.qkv(h).reshape(n, 3, heads, -1).permute(1, 2, 0, 3)
            logits = (q @ k.transpose(-2, -1)) * attn.scale + size.log().view(1, 1, n)
            probs = logits.softmax(-1)
            tokens = tokens + blk.ls1(attn.proj((probs @ v).transpose(0, 1).reshape(n, -1)))
            k_p, k_m = kept_counts(schedule, 197)[layer]
            if k_m < n:
                importance = probs[:, 0].mean(0).tolist()
                order = [0] + sorted(range(1, n), key=lambda i: (-importance[i], i))
                kept, sources = order[:k_m], order[k_m:k_p]
                members = {j: [j] for j in kept}
                weights = {j: [1.0] for j in kept}
                for s in sources:
                    sims = [float(torch.nn.functional.cosine_similarity(tokens[s], tokens[j], dim=0)) for j in kept[1:]]
                    best = max(range(len(sims)), key=lambda i: (sims[i], -i))
                    members[kept[1 + best]].append(s)
                    weights[kept[1 + best]].append(sims[best])
                new_tokens, new_size = [], []
                for j in kept:
                    group = members[j]
                    if mode == "mean":
                        new_tokens.append(sum(tokens[m] for m in group) / len(group))
                        new_size.append(sum(w * size[m] for w, m in zip(weights[j], group)))
                    else:
                        total = sum(size[m] for m in group)
                        new_tokens.append(sum(size[m] * tokens[m] for m in group) / total)
                        new_size.append(total)
                tokens, size = torch.stack(new_tokens), torch.stack([torch.as_tensor(s) for s in new_size])
            tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
        outs.append(model.head(model.fc_norm(model.norm(tokens)[0])))
        sizes.append(size)
    return torch.stack(outs), torch.stack(sizes)


@pytest.mark.parametrize("mode", ["mean", "size_weighted"])
def test_logits_equal_the_authors_algorithm(mode):
    model = make("deit_small_patch16_224", depth=6)
    schedule = {k: v[:6] for k, v in presets()["deit_small_patch16_224"]["2.3"].items()}
    schedule["merge_kept_num"][-1] = 40  # end with a real merge step at this depth
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    tome_plus.patch(model, "diffrate", schedule=schedule, merge=mode)
    with torch.no_grad():
        out = model(images)
        ref, ref_size = naive_diffrate(model, images, schedule, "mean" if mode == "mean" else "wavg")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    size = tome_plus.inspect(model).size[..., 0]
    # the sizes the reference's merges give, token for token (in any order)
    torch.testing.assert_close(size.sort(dim=1).values, ref_size.float().sort(dim=1).values, rtol=1e-4, atol=1e-4)
    assert bool((size.amax(dim=1) > 1.5).all())  # something merged: sizes were updated
    assert torch.equal(size[:, 0], torch.ones(2))  # the class token is never a destination


def test_schedule_json_round_trip(tmp_path):
    schedule = presets()["deit_tiny_patch16_224"]["0.8"]
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(schedule))
    a, b = make("vit_tiny_patch16_224"), make("vit_tiny_patch16_224")
    tome_plus.patch(a, "diffrate", schedule=str(path))
    tome_plus.patch(b, "diffrate", schedule=schedule)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_distillation_token_stays_and_is_never_a_destination():
    model = make("deit_small_distilled_patch16_224")
    schedule = {k: [198] + v[1:] for k, v in presets()["deit_small_patch16_224"]["2.9"].items()}
    tome_plus.patch(model, "diffrate", schedule=schedule, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    info = tome_plus.inspect(model)
    assert torch.equal(info.size[:, :2], torch.ones(2, 2, 1))
    assert torch.equal(info.source[:, :2, :2], torch.eye(2).expand(2, -1, -1))


def test_errors():
    model = make("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="no published DiffRate schedule .*tome-plus diffrate-search"):
        tome_plus.patch(model, "diffrate", flops=0.6)
    deit = make("deit_small_patch16_224")
    with pytest.raises(ValueError, match="published: 2.3, 2.5, 2.7, 2.9, 3.1"):
        tome_plus.patch(deit, "diffrate", gflops=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        tome_plus.patch(deit, "diffrate", gflops=2.9, flops=0.6)
    with pytest.raises(ValueError, match="not r or keep"):
        tome_plus.patch(deit, "diffrate", r=4)
    with pytest.raises(ValueError, match="13 blocks, the model 12"):
        tome_plus.patch(deit, "diffrate", schedule={"prune_kept_num": [197] * 13, "merge_kept_num": [197] * 13})
    with pytest.raises(ValueError, match="merge must be"):
        tome_plus.patch(deit, "diffrate", gflops=2.9, merge="max")
    assert math.isclose(float(min(presets()["deit_small_patch16_224"], key=float)), 2.3)


def test_schedule_is_for_its_input_size():
    preset = presets()["deit_small_patch16_224"]["2.9"]
    with pytest.raises(ValueError, match="for 197 input tokens .* got 257"):  # at patch: the model's default size
        tome_plus.patch(make("deit_small_patch16_224", img_size=256), "diffrate", schedule=preset)
    model = make("deit_small_patch16_224", dynamic_img_size=True)
    tome_plus.patch(model, "diffrate", schedule=preset)
    with pytest.raises(ValueError, match="for 197 input tokens .* got 257"):  # in a forward at another size
        model(torch.randn(1, 3, 256, 256))


def test_flops_fraction_picks_by_real_cost():
    model = make("deit_tiny_patch16_224")
    tome_plus.patch(model, "diffrate", gflops=0.6)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    named = list(tome_plus.inspect(model).tokens)
    from tome_plus.tools.flops import count_flops
    x = torch.randn(1, 3, 224, 224)
    ratio = count_flops(model, x) / count_flops(tome_plus.unpatch(model) or model, x)
    tome_plus.patch(model, "diffrate", flops=round(ratio, 3))  # the "0.6" preset's real share, not 0.6 / 1.3
    with torch.no_grad():
        model(x)
    assert list(tome_plus.inspect(model).tokens) == named


def test_inspect_config_shows_the_schedule_not_a_budget():
    model = make("deit_small_patch16_224", depth=12)
    tome_plus.patch(model, "diffrate", gflops=2.9)
    config = tome_plus.inspect(model).config
    assert config["r"] is None and config["gflops"] == 2.9
    assert config["kept"] == running_min(presets()["deit_small_patch16_224"]["2.9"], 197)
    from tome_plus.methods import get_method
    assert "kept" not in get_method("diffrate").config_class.option_names()
    with pytest.raises(TypeError, match="unknown option"):
        tome_plus.patch(model, "diffrate", gflops=2.9, kept=[1])
