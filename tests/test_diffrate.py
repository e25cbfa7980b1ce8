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
    outs = []
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
    return torch.stack(outs)


@pytest.mark.parametrize("mode", ["mean", "size_weighted"])
def test_logits_equal_the_authors_algorithm(mode):
    model = make("deit_small_patch16_224", depth=6)
    schedule = {k: v[:6] for k, v in presets()["deit_small_patch16_224"]["2.3"].items()}
    schedule["merge_kept_num"][-1] = 40  # end with a real merge step at this depth
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    tome_plus.patch(model, "diffrate", schedule=schedule, merge=mode)
    with torch.no_grad():
        out = model(images)
        ref = naive_diffrate(model, images, schedule, "mean" if mode == "mean" else "wavg")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    size = tome_plus.inspect(model).size
    if mode == "size_weighted":  # pruned tokens are gone: sizes sum to what is left of the 197
        assert bool((size.sum(dim=(1, 2)) <= 197).all())
    assert torch.equal(size[:, 0], torch.ones(2, 1))  # the class token is never a destination


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


# ---------------------------------------------------------------------------------------- search

import os  # noqa: E402

import torch.multiprocessing as mp  # noqa: E402

from tome_plus import diffrate_search as ds  # noqa: E402


def toy():
    torch.manual_seed(0)
    import timm
    return timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, num_classes=5).eval()


def toy_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def test_masks_are_hard_forward_and_soft_backward():
    rates = ds.DiffRateRates(depth=1, n_tokens=17, n_prefix=1, granularity=4)
    with torch.no_grad():
        rates.prune[0] = torch.tensor([0.5, -0.2, 0.1, 0.3])
    mask, count = rates.mask(rates.prune[0], 17)
    pi = rates.prune[0].softmax(-1).detach()
    expected = (pi * rates.candidates).sum()
    assert count.item() == math.ceil(expected.item())
    assert set(mask.tolist()) <= {0.0, 1.0} and mask.sum().item() == math.ceil(expected.item())
    # backward: d(sum_i w_i m_i)/dtheta equals the gradient of sum_i w_i P_i, P_i = sum_{c > i} pi_c
    w = torch.randn(17)
    (mask * w).sum().backward()
    theta = rates.prune[0].detach().clone().requires_grad_(True)
    prob = torch.stack([(theta.softmax(-1) * (rates.candidates > i)).sum() for i in range(17)])
    (prob * w).sum().backward()
    torch.testing.assert_close(rates.prune.grad[0], theta.grad)


def test_task_gradients_reach_both_rate_logits():
    """The task loss alone (no FLOPs term) moves the prune and the merge logits of every searched
    block (block 0 keeps every token, as in the authors' search; with class-token pooling nothing
    after the last block's attention reads the other tokens, so its counts are free: no gradient)."""
    model, rates = toy().requires_grad_(False), ds.DiffRateRates(4, 17, 1)
    images, labels = toy_batches(1)[0]
    logits, _, _ = ds.search_forward(model, images, rates)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for grad in (rates.prune.grad, rates.merge.grad):
        assert bool((grad[1:-1].abs().sum(-1) > 0).all()) and grad[0].abs().sum() == 0 and grad[-1].abs().sum() == 0
    assert all(p.grad is None for p in model.parameters())


def set_rates(rates, prune, merge):
    """Logits that put all probability on these kept counts per block."""
    with torch.no_grad():
        for logits, counts in ((rates.prune, prune), (rates.merge, merge)):
            logits.fill_(-100.0)
            for layer, c in enumerate(counts):
                logits[layer, rates.candidates.tolist().index(c)] = 100.0


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_search_forward_is_the_patched_model(pool):
    """With the rates on one schedule, the search's masked forward gives the patched model's
    logits (mean merge, similarity sizes, proportional attention); with nothing removed, the
    unpatched model's logits and pre-logits (the distillation target)."""
    model = toy().requires_grad_(False)
    model.global_pool = pool
    images = toy_batches(1)[0][0]
    rates = ds.DiffRateRates(4, 17, 1)
    set_rates(rates, [17, 17, 17, 17], [17, 17, 17, 17])
    logits, pooled, _ = ds.search_forward(model, images, rates)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pooled, model.forward_head(model.forward_features(images), pre_logits=True),
                                   rtol=1e-4, atol=1e-5)
    set_rates(rates, [17, 13, 13, 9], [17, 13, 9, 5])
    logits, _, _ = ds.search_forward(model, images, rates)
    schedule = rates.schedule()
    assert schedule["merge_kept_num"] == [17, 13, 9, 5]
    tome_plus.patch(model, "diffrate", schedule=schedule)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("distill", [False, True])
def test_short_search_moves_flops_toward_the_target(distill):
    model = toy()
    start = ds.search_forward(model.requires_grad_(False), toy_batches(1)[0][0], ds.DiffRateRates(4, 17, 1))[2].item()
    target = 0.6 * ds.full_gmacs(model)
    batches = [(x, None if distill else y) for x, y in toy_batches()]
    rates, history = ds.search(model, batches, target, steps=40, lr=0.2, flops_weight=1e5, distill=distill,
                               progress=False)
    assert abs(history[-1]["gflops"] - target) < 0.5 * abs(start - target)
    assert all(p.requires_grad is False for p in model.parameters())  # as it was handed in


def test_searched_schedule_round_trips(tmp_path):
    model = toy()
    rates, _ = ds.search(model, toy_batches(), 0.6 * ds.full_gmacs(model), steps=10, lr=0.2, flops_weight=1e5,
                         progress=False)
    path = str(tmp_path / "s.json")
    written = ds.save_schedule(rates, path, gflops=0.1)
    assert json.loads(open(path).read())["prune_kept_num"] == written["prune_kept_num"]
    tome_plus.patch(model, "diffrate", schedule=path)
    with torch.no_grad():
        model(toy_batches(1)[0][0])
    assert list(tome_plus.inspect(model).tokens) == running_min(written, 17)


def _search_rank(rank, world, init, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = toy()
        rates, _ = ds.search(model, toy_batches(2, seed=rank), 0.01, steps=3, lr=0.2, flops_weight=1e5,
                             progress=False)
        torch.save(rates.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_search_keeps_ranks_equal(tmp_path):
    mp.start_processes(_search_rank, args=(2, f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["prune"].abs().sum() > 0


def test_search_command_with_an_image_folder_and_resume(tmp_path, capsys):
    from PIL import Image
    from tome_plus.tools import cli
    rng = torch.Generator().manual_seed(0)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(40, 40, 3, generator=rng) * 255).byte().numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    out = str(tmp_path / "out" / "s.json")
    args = ["diffrate-search", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "data"), "--flops", "0.6",
            "--batch-size", "4", "--workers", "0", "--no-progress", "--out", out]
    assert cli.main(args + ["--steps", "2"]) == 0
    assert torch.load(out + ".state", weights_only=False)["step"] == 2
    assert cli.main(args + ["--steps", "3", "--resume"]) == 0
    assert torch.load(out + ".state", weights_only=False)["step"] == 3
    schedule = json.loads(open(out).read())
    assert len(schedule["prune_kept_num"]) == 12 and "kept after each block" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["diffrate-search", "--dinov2", "--data", str(tmp_path), "--flops", "0.6", "--out", out])
    assert e.value.code == 2
