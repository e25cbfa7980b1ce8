"""Issue 8: what review and a new user's bad-input run found (core library).

Each test failed before its fix: the authors' PiToMe count, per-forward state under nested calls,
pickling, ties, int64-safe kernels over several channel blocks, and the smaller API items.
"""
import copy
import io
import math
import multiprocessing
import pickle
import warnings

import numpy as np
import pytest
import torch

import tome_plus
from tome_plus.backends.base import get_info
from tome_plus.merging import apply_plan
from tome_plus.methods.tome import bipartite_plan
from tome_plus.triton_kernels import matching as M

from conftest import make
from naive import INTERPRETED, assert_same_matches, loop_cosines


# 1. PiToMe's deit_code preset removes what the authors' code removes -----------------------------

@pytest.mark.parametrize("keep", [0.9, 0.75, 0.7])
def test_pitome_deit_code_uses_the_authors_count(keep):
    model = make("deit_small_patch16_224")
    tome_plus.patch(model, "pitome", keep=keep, preset="deit_code")
    code = get_info(model).removals(197)
    tome_plus.patch(model, "pitome", keep=keep)
    paper = get_info(model).removals(197)
    # written out: the code removes floor(T - T keep), the paper keeps floor(T keep)
    t_code = t_paper = 196
    for layer in range(12):
        assert code[layer] == math.floor(t_code - t_code * keep)
        assert paper[layer] == t_paper - math.floor(t_paper * keep + 1e-9)
        t_code, t_paper = t_code - code[layer], t_paper - paper[layer]
    if keep == 0.9:
        assert (code[0], paper[0]) == (19, 20)  # the count the issue measured at T = 196


# 2. Per-forward state travels with the forward ------------------------------------------------

@torch.no_grad()
def test_nested_forward_does_not_change_the_outer_pooling():
    model = make("vit_tiny_patch16_224", class_token=False, global_pool="avg", depth=4)
    tome_plus.patch(model, "tome", r=8)
    x, other = torch.randn(2, 3, 224, 224), torch.randn(1, 3, 224, 224)
    alone = model(x)
    assert tome_plus.inspect(model).size.shape[0] == 2

    calls = []

    def nested(module, inputs, output):  # runs the model again while the outer head is pending
        if not calls:
            calls.append(1)
            model(other)

    handle = model.norm.register_forward_hook(nested)
    try:
        with_nested = model(x)
    finally:
        handle.remove()
    assert calls
    torch.testing.assert_close(with_nested, alone, rtol=0, atol=0)
    # `inspect` reports the forward that finished last: the outer one
    assert tome_plus.inspect(model).input_tokens == 196


# 3. Patched models pickle and save whole --------------------------------------------------------

def _forward(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_patched_model_round_trips(how):
    model = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(model, "pitome", keep=0.8, trace_source=True)
    x = torch.randn(2, 3, 224, 224)
    ref = _forward(model, x)
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    else:
        clone = copy.deepcopy(model)
    assert torch.equal(_forward(clone, x), ref)
    assert tome_plus.inspect(clone).tokens == tome_plus.inspect(model).tokens
    tome_plus.unpatch(clone)
    assert type(clone) is type(make("vit_tiny_patch16_224", depth=3))
    assert type(clone.blocks[0]).__name__ == "Block"


def test_patched_model_goes_to_a_spawned_process():
    model = make("vit_tiny_patch16_224", depth=2)
    tome_plus.patch(model, "tome", r=8)
    x = torch.randn(1, 3, 224, 224)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out = pool.apply(_forward, (model, x))
    assert torch.equal(out, _forward(model, x))


# 4. Ties: a fixed rule, whatever the batch or the implementation ----------------------------------

def flat_image(seed=0):
    """An image whose patches are bit-equal in large flat regions (the top half, a square)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(3, 224, 224, generator=g)
    img[:, :112] = 0.5
    img[:, 150:214, 16:80] = -1.0
    return img


@pytest.mark.parametrize("method,options", [("tome", {"r": 16}), ("pitome", {"keep": 0.8}),
                                            ("zero_tprune", {"flops": 0.6})])
@torch.no_grad()
def test_flat_regions_group_the_same_alone_and_in_a_batch(method, options):
    model = make("vit_tiny_patch16_224", depth=4)
    tome_plus.patch(model, method, trace_source=True, **options)
    img = flat_image()
    alone = model(img[None])
    source_alone = tome_plus.inspect(model).source[0]
    batch = torch.stack([torch.randn(3, 224, 224), img, torch.randn(3, 224, 224)])
    out = model(batch)
    assert torch.equal(tome_plus.inspect(model).source[1], source_alone)
    torch.testing.assert_close(out[1], alone[0], rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_index():
    """Bit-equal keys: the first of equal best matches wins, and equal scores rank by position."""
    keys = torch.zeros(1, 197, 4)
    keys[..., 0] = 1.0  # every token has the same key: all scores are equal
    plan = bipartite_plan(keys, 16, 1)
    # A = even positions 2, 4, ..., B = odd 1, 3, ... (class token 0 protected): the first 16 of A
    # go, all into the first token of B, which sits right after the class token and unmerged A
    a_pos, b_pos = list(range(2, 197, 2)), list(range(1, 197, 2))
    assert plan.src.tolist() == [a_pos[:16]]
    assert plan.keep.tolist() == [[0] + a_pos[16:] + b_pos]
    assert plan.dst.tolist() == [[1 + len(a_pos) - 16] * 16]


def test_equal_energies_and_importances_rank_by_position():
    from tome_plus.methods.pitome import Pitome, PitomeConfig
    from tome_plus.methods.zero_tprune import ZeroTPrune, ZeroTPruneConfig
    from tome_plus.state import TokenState

    n, k = 197, 20
    keys = torch.zeros(1, n, 4)
    keys[..., 0] = 1.0
    pitome = Pitome(PitomeConfig(keep=0.9))
    state = TokenState(reducer=pitome, removals=(k,) * 12, n_prefix=1, has_cls=True, prop_attn=True,
                       batch=1, n_input=n)
    plan = pitome.plan({"keys": keys}, state, k)
    # equal energies: candidates are the first 2k positions, A = 1, 3, ..., B = 2, 4, ...
    assert plan.src.tolist() == [list(range(1, 2 * k + 1, 2))]
    assert plan.keep.tolist() == [[0] + list(range(2 * k + 1, n)) + list(range(2, 2 * k + 1, 2))]

    zt = ZeroTPrune(ZeroTPruneConfig(r=[k] * 12, s_share=0.0, init="uniform"))
    zt.check(12)
    # each token attending to itself alone: every importance equal, exactly, whatever a BLAS's
    # summation order (uniform attention sums n equal terms, which a GEMV may round per column)
    attn = torch.eye(n).expand(1, 2, n, n).contiguous()
    state = TokenState(reducer=zt, removals=(k,) * 12, n_prefix=1, has_cls=True, prop_attn=False,
                       batch=1, n_input=n)
    plan = zt.plan({"attn": attn, "keys": keys}, state, k)
    assert plan.keep.tolist() == [list(range(n - k))]  # the last k go


def _tied_metric(batch=2, n=40, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, dim, generator=g)
    metric[:, 10:30] = metric[:, 10:11]  # twenty bit-equal tokens
    return metric


def test_triton_and_twin_agree_on_ties():
    metric = _tied_metric()
    for split in (None, "energy"):
        if split is None:
            a_idx = torch.arange(1, 40, 2).expand(2, -1)
            b_idx = torch.arange(2, 40, 2).expand(2, -1)
        else:
            order = torch.arange(1, 40).flip(0).expand(2, -1)
            a_idx, b_idx = order[:, 0::2], order[:, 1::2]
        s_t, i_t = M.bipartite_match_triton(metric, a_idx, b_idx)
        s_p, i_p = M.bipartite_match_torch(metric, a_idx, b_idx)
        assert_same_matches(i_t, i_p, s_t, loop_cosines(metric, a_idx, b_idx))
        torch.testing.assert_close(s_t, s_p, rtol=1e-6, atol=1e-6)


def test_nan_keys_agree_between_triton_and_twin():
    metric = _tied_metric()
    metric[0, 5] = float("nan")  # an A token
    metric[1, 8] = float("nan")  # a B token
    a_idx = torch.arange(1, 40, 2).expand(2, -1)
    b_idx = torch.arange(2, 40, 2).expand(2, -1)
    s_t, i_t = M.bipartite_match_triton(metric, a_idx, b_idx)
    s_p, i_p = M.bipartite_match_torch(metric, a_idx, b_idx)
    if INTERPRETED:  # the bit-equal tokens may tie an ulp apart there (naive.INTERPRETED): the NaNs alone
        assert (i_t[1] != 3).all()
    else:
        assert torch.equal(i_t, i_p)
    assert torch.equal(s_t.isneginf(), s_p.isneginf()) and not s_p.isnan().any()
    torch.testing.assert_close(s_t[s_t.isfinite()], s_p[s_p.isfinite()], rtol=1e-6, atol=1e-6)
    assert s_p[0, 2] == float("-inf")  # the NaN A token (position 5) never finds a match
    assert (i_p[1] != 3).all()  # the NaN B token (position 8) is nobody's match


# 6. Kernels over several channel blocks (int64 offsets) ------------------------------------------

def test_merge_and_match_kernels_with_wide_channels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 1100, generator=g)  # 1100 > 1024: two channel blocks in the merge kernel
    size = torch.rand(2, 12, 1, generator=g) + 0.5
    plan = bipartite_plan(x, 4, 1)  # features as metric: 1100 > 64, walked in chunks
    out_t, size_t, _ = M.merge_wavg_triton(x, size, plan.keep, plan.src, plan.dst)
    out_p, size_p, _ = M.merge_wavg_torch(x, size, plan.keep, plan.src, plan.dst)
    torch.testing.assert_close(out_t, out_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(size_t, size_p)
    # and against the plain definition: each kept token averages itself and its sources by size
    for b in range(2):
        for out_pos, token in enumerate(plan.keep[b].tolist()):
            members = [token] + [s for s, d in zip(plan.src[b].tolist(), plan.dst[b].tolist()) if d == out_pos]
            w = size[b, members]
            ref = (x[b, members] * w).sum(0) / w.sum()
            torch.testing.assert_close(out_t[b, out_pos], ref, rtol=1e-5, atol=1e-6)
    s_t, i_t = M.bipartite_match_triton(x, plan.keep[:, 1:4], plan.keep[:, 4:])
    s_p, i_p = M.bipartite_match_torch(x, plan.keep[:, 1:4], plan.keep[:, 4:])
    assert_same_matches(i_t, i_p, s_t, loop_cosines(x, plan.keep[:, 1:4], plan.keep[:, 4:]))
    torch.testing.assert_close(s_t, s_p, rtol=1e-5, atol=1e-6)


# 7. Smaller items --------------------------------------------------------------------------------

@torch.no_grad()
def test_jit_trace_of_zero_tprune():
    model = make("vit_tiny_patch16_224", depth=4)
    tome_plus.patch(model, "zero_tprune", flops=0.7)
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the schedule is fixed for this size
        traced = torch.jit.trace(model, x, check_trace=False)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unreachable_flops_at_another_input_size_warns_and_clamps():
    model = make("vit_tiny_patch16_224", dynamic_img_size=True, depth=4)
    tome_plus.patch(model, "tome", flops=0.45)
    x = torch.randn(1, 3, 48, 48)  # 9 patches: no schedule reaches 45% of the FLOPs (224 px does)
    with pytest.warns(UserWarning, match="flops=0.45") as record:
        out = model(x)
    assert record[0].filename == __file__  # points at the caller's line
    assert torch.isfinite(out).all()
    # the closest schedule: as many tokens as ToMe can take in each layer
    assert tome_plus.inspect(model).tokens == (6, 4, 3, 2)
    with pytest.raises(ValueError, match="flops=0.1"):  # at patch time it is still an error
        tome_plus.patch(model, "tome", flops=0.1)


def test_clamping_warning_points_at_the_callers_line():
    model = make("vit_tiny_patch16_224", depth=4)
    with pytest.warns(UserWarning, match="clamped") as record:
        tome_plus.patch(model, "tome", r=120)
    assert record[0].filename == __file__


def test_failed_repatch_keeps_the_working_patch():
    model = make("vit_tiny_patch16_224", depth=4)
    x = torch.randn(1, 3, 224, 224)
    tome_plus.patch(model, "tome", r=8)
    ref = _forward(model, x)
    for bad in ({"flops": 0.01}, {"r": -1}, {"nope": 1}):
        with pytest.raises((ValueError, TypeError)):
            tome_plus.patch(model, "tome", **bad)
        assert get_info(model).config.r == 8
        assert torch.equal(_forward(model, x), ref)


@torch.no_grad()
def test_inspect_size_lives_where_the_model_does():
    model = make("vit_tiny_patch16_224", depth=2).to("meta")
    tome_plus.patch(model, "tome", r=0)
    model(torch.empty(1, 3, 224, 224, device="meta"))
    assert tome_plus.inspect(model).size.device.type == "meta"


@pytest.mark.parametrize("options,message", [
    ({"layers": []}, "layers"), ({"iters": 5}, "iters"), ({"iters": [2.5] * 4}, "iters"),
])
def test_zero_tprune_option_errors(options, message):
    model = make("vit_tiny_patch16_224", depth=4)
    with pytest.raises(ValueError, match=message):
        tome_plus.patch(model, "zero_tprune", **options)


def test_numpy_scalars_are_numbers():
    model = make("vit_tiny_patch16_224", depth=4)
    for method, given, plain in [("pitome", {"keep": np.float32(0.9)}, {"keep": 0.9}),
                                 ("tome", {"r": np.int64(8)}, {"r": 8}),
                                 ("tome", {"flops": np.float64(0.7)}, {"flops": 0.7}),
                                 ("zero_tprune", {"s_share": np.float32(0.25), "r": [np.int32(3)] * 4},
                                  {"s_share": 0.25, "r": [3] * 4})]:
        tome_plus.patch(model, method, **given)
        got = get_info(model).removals(197)
        tome_plus.patch(model, method, **plain)
        assert got == get_info(model).removals(197)
    with pytest.raises(ValueError, match=r"got 1\.5"):
        tome_plus.patch(model, "pitome", keep=np.float32(1.5))


@torch.no_grad()
def test_jit_trace_with_triton_kernels(monkeypatch):
    """A Triton launch bypasses the dispatcher, so a trace would replay empty index tensors: tracing
    runs the PyTorch twins."""
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    model = make("vit_tiny_patch16_224", depth=2, img_size=64)
    tome_plus.patch(model, "tome", r=4)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    y = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(traced(y), model(y), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_head_of_the_users_runs_and_pools_by_size():
    from timm.models.vision_transformer import VisionTransformer
    model = make("vit_tiny_patch16_224", class_token=False, global_pool="avg", depth=3)
    tome_plus.patch(model, "tome", r=8)
    x = torch.randn(2, 3, 224, 224)
    ref = model(x)
    model.forward_head = lambda feats, pre_logits=False: VisionTransformer.forward_head(model, feats) + 1.0
    torch.testing.assert_close(model(x), ref + 1.0, rtol=1e-6, atol=1e-6)
