"""A patched HF vision-language model's checkpoint is the unpatched one's: `save_pretrained` writes
the same keys and tensors, `from_pretrained` of it loads into the unpatched class, HF's conversion
mapping is the same, and ATP's modules stay off the model (on the patch record, saved with
`tome_plus.atp.save`). Every check compares against the unpatched model."""
import copy
import json
import os
import pickle

import pytest
import torch

pytest.importorskip("transformers", reason='HF checkpoint tests need transformers: pip install -e ".[hf]"')

from safetensors.torch import load_file  # noqa: E402
from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: E402

import tome_plus  # noqa: E402
import vlm_models as V  # noqa: E402
from test_hf import llava, pixels, prompts  # noqa: E402,F401

FAMILIES = {"llava": llava,
            **{name: (lambda make=V.FACTORIES[name]: make(text_config={"num_hidden_layers": 4}))
               for name in ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")}}
METHODS = {"fastv": dict(keep=0.5), "tome": dict(site="features", keep=0.5), "atp": dict(keep=0.5)}


def saved(model, path):
    """What `save_pretrained` writes: every tensor of every safetensors file, by key."""
    model.save_pretrained(path)
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def conversions(model):
    """HF's weight transforms for `model` (load; reversed at save), with what their repr leaves out."""
    return [(repr(t), getattr(t, "scope_prefix", None), getattr(t, "base_model_prefix", None),
             repr(getattr(t, "operations", None))) for t in get_model_conversion_mapping(model)]


def layout(model):
    return list(model.state_dict()), [n for n, _ in model.named_parameters()], [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_checkpoint_is_the_unpatched_one(family, method, tmp_path):
    model = FAMILIES[family]()
    unpatched_cls = type(model)
    ref, ref_layout, ref_conv = saved(model, tmp_path / "ref"), layout(model), conversions(model)
    tome_plus.patch(model, method, **METHODS[method])
    assert conversions(model) == ref_conv
    assert layout(model) == ref_layout
    got = saved(model, tmp_path / "patched")
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    _, info = unpatched_cls.from_pretrained(tmp_path / "patched", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with open(tmp_path / "patched" / "config.json") as f:  # the architecture HF's Auto classes load
        assert json.load(f)["architectures"] == [unpatched_cls.__name__]
    assert type(type(model).from_pretrained(tmp_path / "patched")) is unpatched_cls  # a model, unpatched
    assert type(type(model)._from_config(model.config)) is unpatched_cls
    tome_plus.unpatch(model)
    assert conversions(model) == ref_conv and layout(model) == ref_layout
    assert saved(model, tmp_path / "unpatched").keys() == ref.keys()


def test_atp_on_a_model_built_on_the_meta_device(pixels):
    """HF builds models on the meta device and fills them (`from_pretrained`, `to_empty`): ATP's
    modules, patched then, are real (they are not the model's weights, nothing would fill them)."""
    from transformers import LlavaForConditionalGeneration
    ref = llava()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(ref.config)
        tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    for buffer, source in zip(model.buffers(), ref.buffers()):  # non-persistent ones too
        buffer.copy_(source)
    tome_plus.patch(ref, "atp", keep=0.5, layers=[0, 2])
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():  # zero-shot: the modules' thresholds are not read, the kept tokens are ref's
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert not any(p.is_meta for p in tome_plus.atp.modules(model).parameters())
    torch.testing.assert_close(got, want)


def test_atp_modules_stay_off_the_model_and_round_trip(pixels, tmp_path):
    model = llava()
    names = {n for n, _ in model.named_modules()}
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    mods = tome_plus.atp.modules(model)
    params = {id(p) for p in model.parameters()}
    assert not any(id(p) in params for p in mods.parameters())
    assert not any(m is mods for m in model.modules()) and {n for n, _ in model.named_modules()} == names
    tome_plus.atp.save(model, tmp_path / "atp.pt")
    trained = {k: v.clone() for k, v in mods.state_dict().items()}
    for p in mods.parameters():
        torch.nn.init.normal_(p)
    tome_plus.atp.load(model, tmp_path / "atp.pt")
    assert all(torch.equal(v, trained[k]) for k, v in mods.state_dict().items() if k != "trained")
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # the record carries them
        twin_mods = tome_plus.atp.modules(twin)
        assert twin_mods is not mods and all(torch.equal(v, mods.state_dict()[k])
                                             for k, v in twin_mods.state_dict().items())
    # they follow the model's dtype where used (the model's .to() does not reach them)
    model.to(torch.bfloat16)
    mods.trained.fill_(True)
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(torch.bfloat16))
    assert next(mods.parameters()).dtype == torch.bfloat16
    assert tome_plus.inspect(model).llm_kept is not None
    tome_plus.unpatch(model)
    assert {n for n, _ in model.named_modules()} == names
    with pytest.raises(ValueError, match="not patched"):
        tome_plus.atp.modules(model)
