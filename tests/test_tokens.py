"""`tokens=N`: budgets in tokens left (ViT layers, LLaVA's tower, FastV and ATP in the LLM)."""
import pytest
import torch

import tome_plus
from tome_plus.methods.atp import top_fraction
from tome_plus.schedule import solve

from conftest import make


def even_split_reference(total, active, caps):
    """Written out: `total` removals, floor(total / n) per active layer and one more in the first
    total % n of them; a layer takes at most its cap and hands the rest to the next active layer."""
    n = len(active)
    shares = {layer: total // n + (1 if i < total % n else 0) for i, layer in enumerate(active)}
    counts, carry = [], 0
    for layer, cap in enumerate(caps):
        if layer not in shares:
            counts.append(0)
            continue
        asked = shares[layer] + carry
        counts.append(min(asked, cap))
        carry = asked - counts[-1]
    return counts, carry


@pytest.mark.parametrize("caps,active,target", [
    ([50] * 6, range(6), 30),          # 70 removals: 12 in the first four, 11 after
    ([3, 50, 0, 50, 50, 50], range(6), 20),  # clamped layers pass their excess on
    ([50] * 6, [1, 3, 4], 91),         # inactive layers take nothing
    ([50] * 6, range(6), 100),         # every token: nothing removed
])
def test_solve_tokens_against_the_reference(caps, active, target):
    active = list(active)
    counts = solve(("tokens", target), "r", 6, 101, 1, lambda layer, n, p: caps[layer], cost=None,
                   active=lambda layer: layer in active)
    expected, carry = even_split_reference(100 - target, active, caps)
    assert carry == 0 and counts == expected and 100 - sum(counts) == target


def test_solve_tokens_unreachable_raises_strict_and_warns_in_a_forward():
    caps = lambda layer, n, p: 2
    with pytest.raises(ValueError, match="tokens=3 is not reachable"):
        solve(("tokens", 3), "r", 4, 21, 1, caps, cost=None)
    with pytest.warns(UserWarning, match="tokens=3 is not reachable"):
        assert solve(("tokens", 3), "r", 4, 21, 1, caps, cost=None, strict=False) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="not reachable"):  # more than there are
        solve(("tokens", 30), "r", 4, 21, 1, caps, cost=None)


@pytest.mark.parametrize("method", ["tome", "pitome", "zero_tprune"])
@pytest.mark.parametrize("n", [5, 1, 16])
def test_vit_ends_with_exactly_n_reducible_tokens(method, n):
    model = make("vit_tiny_patch16_224", img_size=64)  # 16 patches + the class token, 12 blocks
    tome_plus.patch(model, method, tokens=n)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    info = tome_plus.inspect(model)
    assert info.tokens[-1] - 1 == n
    assert sum(info.removals) == 16 - n


def test_budget_errors():
    model = make("vit_tiny_patch16_224", img_size=64)
    with pytest.raises(ValueError, match="give one budget, not r and tokens"):
        tome_plus.patch(model, "tome", r=2, tokens=8)
    with pytest.raises(ValueError, match="give one budget"):
        tome_plus.patch(model, "pitome", keep=0.5, tokens=8)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="tokens must be an int >= 1"):
            tome_plus.patch(model, "tome", tokens=bad)
    with pytest.raises(ValueError, match="tokens=17 is not reachable"):
        tome_plus.patch(model, "tome", tokens=17)
    with pytest.raises(ValueError, match="nor tokens"):
        tome_plus.patch(model, "diffrate", tokens=8)
    assert tome_plus.patch(model, "tome", tokens=8) is model


def test_command_line_budget():
    import argparse
    from tome_plus.tools.common import add_method_args, method_options
    parser = argparse.ArgumentParser()
    add_method_args(parser)
    assert method_options(parser.parse_args(["--tokens", "64"]))["tokens"] == 64
    assert method_options(parser.parse_args(["--budget", "tokens=64"]))["tokens"] == 64


def test_top_fraction_integer_counts_are_exact():
    visual = torch.ones(1, 576, dtype=torch.bool)
    for n in (1, 7, 64, 100, 144, 575):
        assert int(top_fraction(torch.randn(1, 576), visual, n / 576).sum()) == n


# ---------------------------------------------------------------------------------------- LLaVA

transformers = pytest.importorskip("transformers", reason='LLaVA tests need transformers: pip install -e ".[hf]"')

from test_hf import N_IMAGE, greedy, llava, prompts  # noqa: E402


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


def two_rows(n_image=N_IMAGE):
    """Rows with 1 and 2 images (3 images in all)."""
    return prompts((3, 5), (1, 2), n_image=n_image, images_per_row=[1, 2])


@pytest.mark.parametrize("strategy,extra", [("default", 0), ("full", 1)])
def test_llava_tower_passes_n_image_tokens_per_image(strategy, extra, pixels):
    model = llava(strategy=strategy)
    tome_plus.patch(model, "tome", tokens=40)
    ids, mask = two_rows(N_IMAGE + extra)
    out = greedy(model, ids, mask, pixels)
    info = tome_plus.inspect(model)
    assert info.image_tokens.tolist() == [40 + extra, 2 * (40 + extra)]
    assert info.tokens[2] - 1 == 40  # the class token is the prefix; "full" passes it on too
    assert torch.equal(out, greedy(model, ids, mask, pixels, use_cache=False))


def test_llava_tower_unreachable_tokens_is_refused():
    model = llava()
    with pytest.raises(ValueError, match="tokens=5 is not reachable"):  # 3 ToMe layers: at best 64 -> 8
        tome_plus.patch(model, "tome", tokens=5)


def test_fastv_keeps_n_visual_tokens_per_image(pixels):
    model = llava()
    tome_plus.patch(model, "fastv", tokens=10, k=1)
    ids, mask = two_rows()
    out = greedy(model, ids, mask, pixels)
    info = tome_plus.inspect(model)
    assert info.image_tokens.tolist() == [N_IMAGE, 2 * N_IMAGE]
    assert info.llm_kept.tolist() == [[10, 20]]
    assert torch.equal(out, greedy(model, ids, mask, pixels, use_cache=False))


def test_atp_tokens_is_keep_per_image(pixels):
    model = llava()
    ids, mask = two_rows()
    tome_plus.patch(model, "atp", keep=32 / N_IMAGE, layers=[0, 2])
    ref, ref_kept = greedy(model, ids, mask, pixels), tome_plus.inspect(model).llm_kept
    tome_plus.patch(model, "atp", tokens=32, layers=[0, 2])
    assert tome_plus.inspect(model).config["keep"] == 0.5
    assert torch.equal(greedy(model, ids, mask, pixels), ref)
    info = tome_plus.inspect(model)
    assert torch.equal(info.llm_kept, ref_kept) and info.image_tokens.tolist() == [N_IMAGE, 2 * N_IMAGE]
    # with a tower method, per image counts what the tower hands over: 65 - 3 x 6 - 1 = 46
    tome_plus.patch(model, "atp", tokens=23, layers=[0, 2], tower={"method": "tome", "r": 6})
    assert tome_plus.inspect(model).config["keep"] == 0.5
    with pytest.raises(ValueError, match="more than the 64 image tokens"):
        tome_plus.patch(model, "atp", tokens=65)


@pytest.mark.parametrize("method", ["tome", "fastv", "atp"])
def test_every_token_gives_the_unpatched_output(method, pixels):
    model = llava()
    ids, mask = two_rows()
    ref = greedy(model, ids, mask, pixels)
    tome_plus.patch(model, method, tokens=N_IMAGE)
    assert torch.equal(greedy(model, ids, mask, pixels), ref)
    info = tome_plus.inspect(model)
    assert info.image_tokens.tolist() == [N_IMAGE, 2 * N_IMAGE]
    if method != "tome":
        assert (info.llm_kept == info.image_tokens).all()
