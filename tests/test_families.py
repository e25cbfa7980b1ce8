"""The family tables: `vlm.families.FAMILIES` (one row per vision-language `config.model_type`) and
`llm.decoders.DECODERS` (one row per text model), against the installed transformers and the tiny
models of every family (`tests/vlm_models.py`, LLaVA-1.5 and VipLLaVA built here)."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers", reason='VLM tests need transformers: pip install -e ".[hf]"')

import transformers  # noqa: E402
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          MistralConfig, Qwen3Config, VipLlavaConfig, VipLlavaForConditionalGeneration)

import tome_plus  # noqa: E402
import vlm_models as V  # noqa: E402
from tome_plus.backends import hf_llava  # noqa: E402
from tome_plus.llm import decoders  # noqa: E402
from tome_plus.methods import get_method  # noqa: E402
from tome_plus.llm.decoders import DECODERS, decoder_adapter, matches_decoder  # noqa: E402
from tome_plus.vlm.families import FAMILIES, family  # noqa: E402

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=200, pad_token_id=0)


def llava(text=None):
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=text or LlamaConfig(**TEXT),
                         image_token_id=199)
    return LlavaForConditionalGeneration(config).eval()


def vipllava():
    torch.manual_seed(0)
    config = VipLlavaConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=LlamaConfig(**TEXT),
                            image_token_id=199)
    return VipLlavaForConditionalGeneration(config).eval()


BUILDERS = dict(llava=llava, vipllava=vipllava, **V.FACTORIES)


def test_every_row_names_classes_of_the_installed_transformers():
    for key, row in FAMILIES.items():
        assert key == row.model_type
        model_cls, inner_cls = row.classes()
        assert model_cls.config_class.model_type == key and inner_cls.config_class.model_type == key
        assert row.tower in (None, "clip") and (row.tower is not None or row.packed)
        assert row.decoder is None or row.decoder in DECODERS
    for key, row in DECODERS.items():
        assert key == row.model_type and getattr(transformers, row.model).config_class.model_type == key
        assert decoders.unsupported(row) == [], f"{key} asks for what the loop does not implement"


def test_every_supported_model_class_has_a_row():
    assert {cls.__name__ for cls in hf_llava.MODELS} == {row.model for row in FAMILIES.values()}
    assert set(BUILDERS) == set(FAMILIES), "tests/vlm_models.py (or this file) builds a tiny model of every row"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_tiny_models_agree_with_their_rows(name):
    model = BUILDERS[name]()
    row = family(model)
    assert row is FAMILIES[model.config.model_type] and family(model.model) is row
    assert hf_llava.matches(model)
    assert (hf_llava.default_site(model, get_method("tome")) == "tower") == (row.tower is not None)
    newline = getattr(model.model, row.newline) if row.newline else None
    assert (newline is not None) == hasattr(model.model, "image_newline")
    llm = model.model.language_model
    adapter = decoder_adapter(llm)
    assert adapter is DECODERS[llm.config.model_type]
    assert row.decoder in (None, adapter.model_type)
    assert matches_decoder(llm)


def test_a_sliding_window_in_use_is_refused_as_the_row_says():
    window = MistralConfig(**TEXT, sliding_window=4)
    llm = llava(text=window).model.language_model
    assert decoder_adapter(llm) is DECODERS["mistral"] and DECODERS["mistral"].sliding_window == "refused"
    assert not matches_decoder(llm)
    assert matches_decoder(llava(text=MistralConfig(**TEXT, sliding_window=None)).model.language_model)
    with pytest.raises(TypeError, match="without a sliding window in use"):
        tome_plus.patch(llava(text=window), "fastv", keep=0.5, k=1)


@pytest.mark.parametrize("field,value,says", [("rotary", "3d", "rotary positions '3d'"),
                                              ("sliding_window", "cropped", "sliding window 'cropped'")])
def test_a_row_asking_for_what_is_not_implemented_is_refused_at_patch(monkeypatch, field, value, says):
    """A future row asking for what the loop does not implement (other rotary positions, a window
    the cache crops) is refused by name."""
    monkeypatch.setitem(DECODERS, "llama", dataclasses.replace(DECODERS["llama"], **{field: value}))
    model = llava()
    with pytest.raises(TypeError, match=f"does not support {says} yet"):
        tome_plus.patch(model, "fastv", keep=0.5, k=1)
    with pytest.raises(TypeError, match=f"does not support {says} yet"):
        tome_plus.patch(model, kv="a2sf", kv_options={"budget": 8})
    assert not hasattr(model, "_tome_plus")


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen3Config])
def test_the_loops_own_queries_and_keys_are_the_layers(config_cls):
    """Where the loop forms q and k itself (Zero-TPrune's graph and VisionZip at the features site,
    PyramidDrop's next-layer rank), a q/k-normed decoder (Qwen3) gets its norms: the last query's
    probabilities equal the eager layer's own (`output_attentions`)."""
    from tome_plus.llm.features import image_attention, query_attention

    torch.manual_seed(0)
    llm = getattr(transformers, config_cls.__name__.replace("Config", "Model"))._from_config(
        config_cls(**TEXT, head_dim=16), attn_implementation="eager").eval()
    for name, p in llm.named_parameters():  # norms away from 1, so a missing one shows
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    h = torch.randn(2, 9, 64)
    with torch.no_grad():
        out = llm(inputs_embeds=h, output_attentions=True)
        positions = torch.arange(9).expand(2, 9)
        cos, sin = llm.rotary_emb(h, position_ids=positions)
        last = query_attention(llm.layers[0], h, cos, sin, torch.full((2,), 8), torch.ones(2, 9, dtype=torch.bool))
        every = image_attention(llm.layers[0], h, cos, sin).full()
    expected = out.attentions[0][:, :, -1]
    torch.testing.assert_close(last, expected.mean(dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(every[:, :, -1], expected, atol=1e-5, rtol=1e-4)


def test_deepstack_features_reach_only_a_row_that_adds_them(monkeypatch):
    """Qwen3-VL's DeepStack features are the loop's to carry only where the decoder row says so: a
    row without `deepstack` given them is an error, not features silently dropped."""
    model = V.qwen3_vl()
    inputs = V.qwen3_vl_inputs(model)
    tome_plus.patch(model, "tome", site="features", keep=0.5)
    with torch.no_grad():
        model(**inputs)
    monkeypatch.setitem(DECODERS, "qwen3_vl_text", dataclasses.replace(DECODERS["qwen3_vl_text"], deepstack=False))
    with pytest.raises(ValueError, match="DeepStack features"), torch.no_grad():
        model(**inputs)
