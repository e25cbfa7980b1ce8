"""Tracing, scripting and export of patched models (issue 18, item 7).

Where nothing reduces, `torch.fx.symbolic_trace` (timm's and torchvision's feature extraction) and
`torch.jit.script` see the unpatched model: the same graph, the same scripted code, the same
outputs. With a budget, `torch.export` and `torch.jit.trace` record the schedule of their input's
size and give the eager outputs; FX and scripting refuse in one line that names those two.
"""
import copy
import warnings

import pytest
import timm
import torch
from torch.fx.proxy import TraceError

import tome_plus
from tome_plus.backends.base import SCRATCH

from conftest import make

TINY = dict(img_size=32, depth=3, num_classes=5)  # 4 patches + class token: every tracer in seconds
ZERO = [{"r": 0}, {"r": [0, 0]}, {"r": (0, -1.0)}, {"keep": 1.0}, {"flops": 1.0}]
BUDGETS = [("tome", {"r": 1}), ("pitome", {"keep": [0.6]}), ("zero_tprune", {"keep": [0.6, 1.0, 0.6]})]


def tiny(name="vit_tiny_patch16_224", **kwargs):
    return make(name, **{**TINY, **kwargs})


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # jit.trace's TracerWarnings about Python ints
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def assert_one_line_refusal(excinfo, tool):
    message = str(getattr(excinfo, "value", excinfo))  # a pytest ExceptionInfo or the exception
    assert "\n" not in message and message.startswith(f"tome_plus: {tool}")
    assert "torch.export.export" in message and "torch.jit.trace" in message


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("budget", ZERO, ids=str)
def test_symbolic_trace_at_zero_budget_is_the_original_graph(name, budget, x):
    base = tiny(name)
    model = tome_plus.patch(copy.deepcopy(base), "tome", **budget)
    traced, original = torch.fx.symbolic_trace(model), torch.fx.symbolic_trace(base)
    assert traced.code == original.code
    with torch.no_grad():
        ref = base(x)
        assert torch.equal(traced(x), ref)
        # the model stays patched and keeps working
        n = 4 + base.num_prefix_tokens
        assert torch.equal(model(x), ref) and tome_plus.inspect(model).tokens == (n, n, n)


def test_feature_extraction_at_zero_budget(x):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    base = tiny()
    model = tome_plus.patch(copy.deepcopy(base), "tome", r=0)
    assert get_graph_node_names(model) == get_graph_node_names(base)
    nodes = ["blocks.1", "norm", "head"]
    for build in (timm.models.create_feature_extractor, create_feature_extractor):
        ours, theirs = build(model, return_nodes=nodes), build(base, return_nodes=nodes)
        with torch.no_grad():
            got, want = ours(x), theirs(x)
        assert list(got) == nodes and all(torch.equal(got[k], want[k]) for k in nodes)


def test_timm_feature_extraction_with_dynamic_img_size_at_zero_budget():
    """timm's FX feature extraction wraps its non-traceable helpers (`resample_abs_pos_embed`)
    where the original forward finds them: the patched model traces to the same graph and gives
    the unpatched features at sizes other than the default."""
    from timm.models._features_fx import get_graph_node_names

    base = tiny(dynamic_img_size=True)
    model = tome_plus.patch(copy.deepcopy(base), "tome", r=0)
    assert get_graph_node_names(model) == get_graph_node_names(base)
    nodes = ["blocks.1", "norm", "head"]
    ours = timm.models.create_feature_extractor(model, return_nodes=nodes)
    theirs = timm.models.create_feature_extractor(base, return_nodes=nodes)
    assert ours.code == theirs.code
    torch.manual_seed(3)
    for size in ((32, 32), (48, 64)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            got, want = ours(x), theirs(x)
        assert all(torch.equal(got[k], want[k]) for k in nodes)


def test_script_at_zero_budget_is_the_original_and_shares_its_weights(x):
    base = tiny()
    model = tome_plus.patch(copy.deepcopy(base), "tome", r=0, trace_source=True)
    with torch.no_grad():
        model(x)  # fills whatever the patched forward caches
    scripted, original = torch.jit.script(model), torch.jit.script(base)
    assert scripted.code == original.code
    with torch.no_grad():
        assert torch.equal(scripted(x), base(x))
        # the very parameters, not copies
        model.head.bias.add_(1.0)
        assert torch.equal(scripted(x), base(x) + 1.0)
    # the patched model is untouched: still patched, nothing of the script left on it
    assert type(model).__name__ == "TomePlusVisionTransformer"
    assert all(type(b).__name__ == "TomePlusBlock" for b in model.blocks)
    assert all(SCRATCH not in b.__dict__ for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), base(x) + 1.0)
    assert tome_plus.inspect(model).source.shape == (2, 5, 5)


def test_a_block_scripts_alone_as_the_original_block():
    # a block called without a state is the original block, whatever the model's budget
    base = tiny()
    model = tome_plus.patch(copy.deepcopy(base), "tome", r=1)
    tokens = torch.randn(2, 5, 192)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model.blocks[0])(tokens), base.blocks[0](tokens))


@pytest.mark.parametrize("method,budget", BUDGETS, ids=[m for m, _ in BUDGETS])
def test_export_with_a_budget_equals_eager(method, budget, x):
    model = tome_plus.patch(tiny(), method, **budget)
    with torch.no_grad():
        exported = torch.export.export(model, (x,)).module()  # before any eager forward
        eager = model(x)
        assert tome_plus.inspect(model).tokens != (5, 5, 5)
        assert torch.equal(exported(x), eager)
        other = torch.randn_like(x)
        assert torch.equal(exported(other), model(other))


@pytest.mark.parametrize("method,budget", BUDGETS, ids=[m for m, _ in BUDGETS])
def test_jit_trace_with_a_budget_equals_eager(method, budget, x):
    model = tome_plus.patch(tiny(), method, **budget)
    with torch.no_grad():
        traced = quiet(torch.jit.trace, model, (x,), check_trace=False)
        eager = model(x)
        assert torch.equal(traced(x), eager)
        other = torch.randn_like(x)
        assert torch.equal(traced(other), model(other))


@pytest.mark.parametrize("method,budget", BUDGETS + [("tome", {"keep": 0.9})], ids=str)
def test_fx_and_script_with_a_budget_refuse_in_one_line(method, budget, x):
    model = tome_plus.patch(tiny(), method, **budget)
    with torch.no_grad():
        eager = model(x)
    try:
        traced = torch.fx.symbolic_trace(model)
    except TraceError as e:
        assert_one_line_refusal(e, "torch.fx.symbolic_trace")
    else:  # a static schedule FX could follow must give the eager output
        with torch.no_grad():
            assert torch.equal(traced(x), eager)
    with pytest.raises(RuntimeError) as excinfo:
        torch.jit.script(model)
    assert_one_line_refusal(excinfo, "torch.jit.script")


def test_a_head_refuses_even_at_zero_budget():
    model = tome_plus.patch(tiny(), "tome", r=0, head="clca", head_options={"layers": [1]})
    with pytest.raises(TraceError) as excinfo:
        torch.fx.symbolic_trace(model)
    assert_one_line_refusal(excinfo, "torch.fx.symbolic_trace")
    with pytest.raises(RuntimeError) as excinfo:
        torch.jit.script(model)
    assert_one_line_refusal(excinfo, "torch.jit.script")


def test_dynamic_img_size_counts_every_input_size(x):
    # the graph or script must hold at any size: a budget that removes nothing at the default
    # size but does at others is refused, one that removes nothing anywhere is the original
    base = tiny(dynamic_img_size=True)
    with pytest.raises(TraceError) as unpatched:
        torch.fx.symbolic_trace(base)  # timm's dynamic-size ViT does not trace (shape control flow)
    model = tome_plus.patch(copy.deepcopy(base), "tome", r=0)
    with pytest.raises(TraceError) as patched:
        torch.fx.symbolic_trace(model)
    assert str(patched.value) == str(unpatched.value)  # fails exactly as the unpatched model does
    scripted = torch.jit.script(model)
    with torch.no_grad():
        big = torch.randn(1, 3, 64, 48)
        assert torch.equal(scripted(big), base(big)) and torch.equal(model(big), base(big))
    # flops=0.97 removes nothing from 4 patches (one token would cost too much) but does from 196
    model = tome_plus.patch(copy.deepcopy(base), "tome", flops=0.97)
    info = tome_plus.patch(tiny(), "tome", flops=0.97)._tome_plus
    assert info.removals(5) == (0, 0, 0) and any(info.removals(197))
    with pytest.raises(RuntimeError) as excinfo:
        torch.jit.script(model)
    assert_one_line_refusal(excinfo, "torch.jit.script")
    # the fixed-size model takes only the size where that budget removes nothing
    fixed = tome_plus.patch(tiny(), "tome", flops=0.97)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(fixed)(x), fixed(x))
        assert torch.equal(torch.jit.script(fixed)(x), fixed(x))


class TestHF:
    """transformers' towers do not script (nor FX-trace) in this version: patched at zero budget
    they fail the same way; with a budget they refuse in our one line; export and jit.trace work."""

    @pytest.fixture(autouse=True)
    def _hf(self):
        pytest.importorskip("transformers", reason='HF tests need transformers: pip install -e ".[hf]"')

    @staticmethod
    def towers():
        from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
        shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     image_size=32, patch_size=8)
        torch.manual_seed(0)
        return [CLIPVisionModel(CLIPVisionConfig(**shape)).eval(),
                SiglipVisionModel(SiglipVisionConfig(**shape, vision_use_head=True)).eval()]

    def test_script_and_fx(self):
        for base in self.towers():
            try:
                torch.jit.script(base)
            except Exception as e:  # noqa: BLE001 - whatever transformers raises, we must raise it too
                unpatched = e
            else:
                pytest.fail("transformers' tower scripts now: check that a zero-budget patched one does too")
            model = tome_plus.patch(copy.deepcopy(base), "tome", r=0)
            with pytest.raises(type(unpatched)) as patched:
                torch.jit.script(model)
            assert str(patched.value) == str(unpatched)
            with pytest.raises(TraceError) as excinfo:
                torch.fx.symbolic_trace(model)
            assert_one_line_refusal(excinfo, "torch.fx.symbolic_trace")
            model = tome_plus.patch(copy.deepcopy(base), "tome", r=2)
            for tool, trace, error in (("torch.jit.script", torch.jit.script, RuntimeError),
                                       ("torch.fx.symbolic_trace", torch.fx.symbolic_trace, TraceError)):
                with pytest.raises(error) as excinfo:
                    trace(model)
                assert_one_line_refusal(excinfo, tool)

    def test_export_and_jit_trace_with_a_budget_equal_eager(self):
        torch.manual_seed(2)
        pixels = torch.randn(2, 3, 32, 32)
        for base in self.towers():
            model = tome_plus.patch(base, "tome", r=2)
            with torch.no_grad():
                eager = model(pixels)
                assert eager.last_hidden_state.shape[1] < 16
                exported = torch.export.export(model, (pixels,)).module()(pixels)
                traced = quiet(torch.jit.trace, model, (pixels,), strict=False, check_trace=False)(pixels)
            for out in (exported, traced):
                assert torch.equal(out["last_hidden_state"], eager.last_hidden_state)
                assert torch.equal(out["pooler_output"], eager.pooler_output)
