"""Half precision: a model under fp16/bf16 autocast must choose the tokens fp32 chooses.

Two levels: the signals the attention hands a method are float32 and equal a float64 reference
formed from the same half q/k (so they differ from fp32's only by the rounding of q and k
themselves); and every method's plan, run inside a half-precision forward, equals the plan formed
from the same signals upcast (exactly) to float32 outside autocast: no score inside a plan is
computed in half precision. Ties aside, what is left between a half and an fp32 model is the
rounding of the activations, which no method can undo.
"""
import contextlib

import pytest
import torch

import tome_plus
from tome_plus.reduce import QKV, attention_with_signals
from tome_plus.state import TokenState

from conftest import make

HALVES = [torch.float16, torch.bfloat16]
METHODS = [("tome", {"r": 8}), ("pitome", {"keep": 0.8}), ("pitome", {"keep": 0.8, "metric": "hidden"}),
           ("zero_tprune", {"flops": 0.6}), ("diffrate", {"schedule": {"prune_kept_num": [197, 150, 120, 100],
                                                                      "merge_kept_num": [180, 130, 110, 90]}})]


def _signals_state(prop_attn: bool, batch=2, n=17):
    size = torch.rand(batch, n, 1) * 3 + 1 if prop_attn else None
    return TokenState(reducer=None, removals=(0,), n_prefix=1, has_cls=True, prop_attn=prop_attn, batch=batch,
                      n_input=n, size=size)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("prop_attn", [False, True])
def test_signals_are_float32_from_half_inputs(dtype, prop_attn):
    torch.manual_seed(0)
    heads, d, n = 3, 16, 17
    q, k, v = (torch.randn(2, heads, n, d).mul(3).to(dtype) for _ in range(3))
    qkv = QKV(project=lambda x: (q, k, v), padded=None, heads=heads, head_dim=d, scale=d ** -0.5)
    state = _signals_state(prop_attn)
    x = torch.zeros(2, n, heads * d, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        _, full = attention_with_signals(x, state, frozenset({"attn", "keys"}), qkv)
        _, row = attention_with_signals(x, state, frozenset({"cls_attn"}), qkv)
    # reference: the same half values, float64 arithmetic
    logits = (q.double() @ k.double().transpose(-2, -1)) * d ** -0.5
    if prop_attn:
        logits = logits + state.size.double().log().transpose(1, 2).unsqueeze(1)
    probs = logits.softmax(-1)
    for got, want in [(full["attn"], probs), (row["cls_attn"], probs[:, :, 0]), (full["keys"], k.double().mean(1))]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def recorded_plans(model):
    """Record (signals, state, n_remove, plan) of every plan the patched model makes."""
    reducer = tome_plus.api.get_info(model).reducer
    calls = []
    original = type(reducer).plan

    def plan(self, signals, state, n_remove):
        out = original(self, signals, state, n_remove)
        calls.append((dict(signals), state, n_remove, out))
        return out

    reducer.plan = plan.__get__(reducer)
    try:
        yield calls
    finally:
        del reducer.plan


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: v if isinstance(v, str) else None)
def test_plans_under_autocast_are_formed_in_float32(method, options, dtype):
    """The plan a half forward makes equals the plan formed outside autocast from its signals upcast
    to float32 (exact): no score inside a plan is computed in half precision."""
    model = make("vit_tiny_patch16_224", depth=4)
    tome_plus.patch(model, method, **options)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 224, 224)
    with recorded_plans(model) as calls, torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        model(x)
    assert len(calls) >= 2
    reducer = tome_plus.api.get_info(model).reducer
    for signals, state, n_remove, plan in calls:
        upcast = {name: s.float() for name, s in signals.items()}
        with torch.no_grad():
            want = type(reducer).plan(reducer, upcast, state, n_remove)
        for field in ("keep", "src", "dst"):
            got_f, want_f = getattr(plan, field), getattr(want, field)
            assert (got_f is None) == (want_f is None), field
            if got_f is not None:
                assert torch.equal(got_f, want_f), f"{method} layer {state.layer}: {field} differs"
