"""Qwen3.5: a hybrid decoder (linear-attention layers holding a recurrent state, a full-attention
layer every fourth). The features site reduces before the first layer, so the recurrent states
never see what it removed; what would prune inside (LLM methods, KV policies) or read the first
layer's attention (Zero-TPrune, VisionZip at the features site) is refused by name."""
import pytest
import torch

pytest.importorskip("transformers")

import tome_plus  # noqa: E402
import vlm_models as V  # noqa: E402


def model_and_inputs(family="qwen3_5"):
    model = V.FACTORIES[family](text_config={"num_hidden_layers": 4})
    model.generation_config.eos_token_id = None
    return model, V.INPUTS[family](model)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_the_features_site_runs_the_linear_layers_on_the_kept_tokens(family):
    """Keeping everything: the unpatched logits at every real position of a left-padded batch (the
    linear layers see the padding zeroed, as HF's); reducing: fewer tokens reach every layer, the
    recurrent state continues in decoding as without a cache."""
    model, inputs = model_and_inputs(family)
    assert model.config.text_config.layer_types.count("linear_attention") == 3
    with torch.no_grad():
        ref = model(**inputs).logits
    tome_plus.patch(model, "pitome", site="features", keep=1.0)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=1e-4)
    tome_plus.patch(model, "divprune", site="features", keep=0.5)
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    out = V.greedy(model, inputs, 4)
    hook.remove()
    visual = ((inputs["input_ids"] == V.IMAGE_ID) | (inputs["input_ids"] == V.VIDEO_ID)).sum(1)
    kept = tome_plus.inspect(model).llm_kept[0]
    assert seen[0] == inputs["input_ids"].shape[1] - int((visual - kept).min())
    assert torch.equal(V.greedy(model, inputs, 4, use_cache=False), out)


@pytest.mark.parametrize("method,options,says", [
    ("fastv", {"keep": 0.5}, "form no attention probabilities"),
    ("pyramiddrop", {"keep": 0.5}, "form no attention probabilities"),
    ("zero_tprune", {"site": "features", "keep": 0.5}, "forms no attention among the image's tokens"),
    ("visionzip", {"site": "features", "tokens": 6}, "forms no attention among the image's tokens"),
])
def test_what_does_not_fit_a_linear_attention_decoder_is_refused_by_name(method, options, says):
    model, _ = model_and_inputs()
    with pytest.raises(TypeError, match=says):
        tome_plus.patch(model, method, **options)
    with pytest.raises(TypeError, match="cannot forget one token"):
        tome_plus.patch(model, kv="a2sf", kv_options={"budget": 8})
    assert not hasattr(model, "_tome_plus")
