"""PiToMe against a plain reference (loops over tokens): energy, candidates, matching, merge."""
import math

import pytest
import torch

import tome_plus
from tome_plus.merging import merge_wavg
from tome_plus.methods.pitome import Pitome, PitomeConfig
from tome_plus.state import TokenState

from conftest import PREFIX_MODELS, make
from naive import naive_energy


def naive_pitome(x, size, keys, k, n_prefix, margin, alpha=1.0, variant="paper", tome_matching=False):
    """One image. Returns output x, sizes (as Algorithm 1 orders them) and the energies."""
    n = keys.shape[0]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    body = list(range(n_prefix, n))
    energy = dict(zip(body, naive_energy(keys[n_prefix:], margin, alpha, variant).tolist()))
    order = sorted(body, key=lambda i: -energy[i])
    if tome_matching:
        a_side, b_side = order[0::2], order[1::2]
    else:
        a_side, b_side = order[:2 * k][0::2], order[:2 * k][1::2]
    best = {}
    for a in a_side:
        sims = [float(unit[a] @ unit[b]) for b in b_side]
        j = max(range(len(b_side)), key=lambda q: sims[q])
        best[a] = (sims[j], b_side[j])
    sources = sorted(a_side, key=lambda a: -best[a][0])[:k] if tome_matching else a_side
    groups = {b: [b] for b in b_side}
    for a in sources:
        groups[best[a][1]].append(a)
    if tome_matching:
        untouched = []
        unmerged = sorted(a for a in a_side if a not in sources)
    else:
        untouched, unmerged = sorted(order[2 * k:]), []
    out_order = [[i] for i in range(n_prefix)] + [[i] for i in untouched] + [[i] for i in unmerged]
    out_order += [groups[b] for b in b_side]
    new_x = torch.stack([sum(size[m] * x[m] for m in g) / sum(size[m] for m in g) for g in out_order])
    new_size = torch.stack([sum(size[m] for m in g) for g in out_order])
    return new_x, new_size, energy


def state_for(layer, depth, n_prefix):
    return TokenState(reducer=None, removals=(0,) * depth, n_prefix=n_prefix, has_cls=n_prefix > 0,
                      prop_attn=True, batch=1, n_input=0, layer=layer)


@pytest.mark.parametrize("variant", ["paper", "elu"])
@pytest.mark.parametrize("n,n_prefix,k,layer", [(17, 1, 5, 0), (24, 2, 8, 3), (30, 5, 12, 7), (9, 0, 4, 11)])
def test_plan_matches_naive(variant, n, n_prefix, k, layer):
    torch.manual_seed(n + k)
    batch, depth = 2, 12
    # clustered keys, so energies spread around the margin
    centres = torch.randn(3, 8)
    keys = centres[torch.randint(0, 3, (batch, n))] + 0.5 * torch.randn(batch, n, 8)
    x = torch.randn(batch, n, 6)
    size = torch.randint(1, 4, (batch, n, 1)).float()
    reducer = Pitome(PitomeConfig(keep=0.5, energy=variant))
    plan = reducer.plan({"keys": keys}, state_for(layer, depth, n_prefix), k)
    out, out_size, _ = merge_wavg(plan, x, size)
    margin = 0.9 - 0.9 * layer / depth
    for b in range(batch):
        ref_x, ref_size, _ = naive_pitome(x[b], size[b, :, 0], keys[b], k, n_prefix, margin, variant=variant)
        torch.testing.assert_close(out[b], ref_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_size[b, :, 0], ref_size)
    assert out.shape[1] == n - k
    assert torch.equal(plan.keep[:, :n_prefix], torch.arange(n_prefix).expand(batch, -1))


def test_deit_code_preset_matches_naive_tome_matching_in_early_layers():
    torch.manual_seed(0)
    n, k, depth = 21, 6, 12
    keys, x = torch.randn(1, n, 8), torch.randn(1, n, 4)
    size = torch.ones(1, n, 1)
    config = PitomeConfig(keep=0.9, preset="deit_code")
    assert config.prop_attn is False and config.energy == "elu" and config.margin_at(0, depth) == 0.75
    reducer = Pitome(config)
    for layer, tome_matching in ((2, True), (5, True), (6, False), (11, False)):
        plan = reducer.plan({"keys": keys}, state_for(layer, depth, 1), k)
        out, out_size, _ = merge_wavg(plan, x, size)
        margin = 0.75 - 0.75 * layer / depth
        ref_x, ref_size, _ = naive_pitome(x[0], size[0, :, 0], keys[0], k, 1, margin, variant="elu",
                                          tome_matching=tome_matching)
        torch.testing.assert_close(out[0], ref_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_size[0, :, 0], ref_size)


def test_margin_options():
    assert PitomeConfig().margin_at(6, 12) == pytest.approx(0.45)
    assert PitomeConfig(margin=0.3).margin_at(6, 12) == 0.3
    assert PitomeConfig(margin=lambda l, L: 1.0 - l / L).margin_at(3, 12) == pytest.approx(0.75)


@pytest.mark.parametrize("options", [{"keep": 0.4}, {"keep": [0.9, 0.45]}])
def test_keep_below_half_explains(options):
    with pytest.raises(ValueError, match="2k"):
        PitomeConfig(**options)


@pytest.mark.parametrize("options", [{"energy": "gauss"}, {"preset": "mae"}, {"margin": "high"}, {"margin": True},
                                     {"alpha": -1.0}, {"alpha": "1"}])
def test_bad_options(options):
    with pytest.raises(ValueError):
        PitomeConfig(**options)


@pytest.mark.parametrize("name,kwargs", PREFIX_MODELS)
@torch.no_grad()
def test_model_identity_and_invariants(name, kwargs, images):
    model = make(name, **kwargs)
    ref = model(images)
    tome_plus.patch(model, "pitome", keep=1.0)
    assert torch.equal(model(images), ref)
    p = model.num_prefix_tokens
    tome_plus.patch(model, "pitome", keep=0.9, trace_source=True)
    model(images)
    info = tome_plus.inspect(model)
    n, expected = info.input_tokens, []
    for _ in model.blocks:
        t = n - p
        n -= t - math.floor(t * 0.9 + 1e-9)
        expected.append(n)
    assert list(info.tokens) == expected
    assert torch.equal(info.size.sum((1, 2)), torch.full((2,), float(info.input_tokens)))
    assert torch.equal(info.source.sum(-1, keepdim=True), info.size)
    assert torch.equal(info.source[:, :p, :p], torch.eye(p).expand(2, -1, -1))
    assert torch.equal(info.source[:, :p].sum(-1), torch.ones(2, p))


@pytest.mark.parametrize("budget", [{"r": 10}, {"flops": 0.6}])
def test_other_budget_kinds(budget):
    model = make("vit_tiny_patch16_224")
    tome_plus.patch(model, "pitome", **budget)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    tokens = tome_plus.inspect(model).tokens
    if "r" in budget:
        assert tokens[:3] == (187, 177, 167)
    else:
        assert tokens[-1] < 120
