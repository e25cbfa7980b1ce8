"""HF transformers: CLIP / SigLIP vision towers and LLaVA, on tiny random configs built here."""
import copy
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason='HF tests need transformers: pip install -e ".[hf]"')
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel)

import tome_plus  # noqa: E402
from tome_plus.backends import hf_clip  # noqa: E402
from tome_plus.methods.pitome import Pitome  # noqa: E402

from naive import naive_bipartite_merge  # noqa: E402

TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             image_size=64, patch_size=8)
METHODS = [("tome", {"r": 6}), ("pitome", {"keep": 0.8}), ("zero_tprune", {"flops": 0.7})]
IMAGE_ID, N_IMAGE = 199, 64  # placeholders per image as the processor inserts them: 8 x 8 patches


def clip(**extra):
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**TOWER, **extra)).eval()


def siglip(**extra):
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**TOWER, vision_use_head=True, **extra)).eval()


def llava(strategy="default", feature_layer=-2, tower=CLIPVisionConfig):
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=200, pad_token_id=0)
    config = LlavaConfig(vision_config=tower(**TOWER), text_config=text, image_token_id=IMAGE_ID,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(config).eval()


def prompts(*shapes, n_image=N_IMAGE, left=True, images_per_row=None):
    """Token rows `[BOS, pre..., <image> x n_image per image, post...]`, padded with 0."""
    rows = []
    for i, (pre, post) in enumerate(shapes):
        n = 1 if images_per_row is None else images_per_row[i]
        rows.append([1] + list(range(10, 10 + pre)) + [IMAGE_ID] * (n_image * n) + list(range(50, 50 + post)))
    length = max(map(len, rows))
    pad = lambda r, v: ([v] * (length - len(r)) + r) if left else (r + [v] * (length - len(r)))
    ids = torch.tensor([pad(r, 0) for r in rows])
    mask = torch.tensor([pad([1] * len(r), 0) for r in rows])
    return ids, mask


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


# ---------------------------------------------------------------------------------------- towers

@pytest.mark.parametrize("make_tower", [clip, siglip])
@pytest.mark.parametrize("method", ["tome", "pitome", "zero_tprune"])
def test_tower_zero_budget_is_bit_identical(make_tower, method, pixels):
    model = make_tower()
    with torch.no_grad():
        ref = model(pixels, output_hidden_states=True)
        budget = {"keep": 1.0} if method == "pitome" else {"r": 0}
        tome_plus.patch(model, method, **budget)
        out = model(pixels, output_hidden_states=True)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))


@pytest.mark.parametrize("make_tower", [clip, siglip])
@pytest.mark.parametrize("method,options", METHODS)
def test_tower_reduces_by_the_schedule(make_tower, method, options, pixels):
    model = make_tower()
    if method == "zero_tprune" and make_tower is siglip:
        options = dict(options, init="uniform")  # no class token to start PageRank from
    tome_plus.patch(model, method, **options)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    info = tome_plus.inspect(model)
    n0 = 64 + (make_tower is clip)
    counts = [n0 - sum(info.removals[:i + 1]) for i in range(4)]
    assert list(info.tokens) == counts and counts[-1] < n0
    assert [h.shape[1] for h in out.hidden_states] == [n0] + counts
    assert out.last_hidden_state.shape == (2, counts[-1], 64)
    size = info.size
    if method == "zero_tprune":
        assert torch.equal(size, torch.ones_like(size))
    else:
        assert torch.equal(size.sum(dim=(1, 2)), torch.full((2,), float(n0)))  # every patch counted once
    if make_tower is clip:
        assert torch.equal(size[:, 0], torch.ones(2, 1))  # the class token is never merged


def test_tower_merge_equals_naive_reference(pixels):
    """One reducing layer against a written-out HF CLIP layer + loop bipartite merge + explicit
    proportional attention in the layer after it."""
    model = clip()
    tome_plus.patch(model, "tome", r=[8, 0])
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True).hidden_states
        x = model.pre_layrnorm(model.embeddings(pixels))
        layers = model.encoder.layers

        def naive_attention(layer, h, size):
            attn = layer.self_attn
            split = lambda t: t.view(h.shape[0], h.shape[1], 4, 16).transpose(1, 2)
            q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
            logits = q @ k.transpose(-2, -1) * attn.scale + size.log().view(h.shape[0], 1, 1, -1)
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
            return attn.out_proj(y), k.mean(1)

        ones = torch.ones(2, x.shape[1])
        y, keys = naive_attention(layers[0], layers[0].layer_norm1(x), ones)
        x = x + y
        merged, sizes = [], []
        for b in range(2):
            xb, sb, _ = naive_bipartite_merge(x[b], ones[b], keys[b], 8, 1)
            merged.append(xb)
            sizes.append(sb)
        x, size = torch.stack(merged), torch.stack(sizes)
        x = x + layers[0].mlp(layers[0].layer_norm2(x))
        torch.testing.assert_close(out[1], x, rtol=1e-5, atol=1e-5)
        y, _ = naive_attention(layers[1], layers[1].layer_norm1(x), size)
        x = x + y
        x = x + layers[1].mlp(layers[1].layer_norm2(x))
        torch.testing.assert_close(out[2], x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,options", [("tome", {"r": 8}), ("pitome", {"keep": 0.8})])
def test_size_channel_equals_mask_path(method, options, monkeypatch, pixels):
    model = clip()
    tome_plus.patch(model, method, **options)
    monkeypatch.setattr(tome_plus.reduce, "CHANNEL_DEVICES", frozenset({"cuda", "cpu"}))  # the GPU layout
    with torch.no_grad():
        out = model(pixels).last_hidden_state
        monkeypatch.setattr(hf_clip, "SIZE_CHANNEL", False)
        ref = model(pixels).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pitome_uses_the_layer_output_on_hf(monkeypatch, pixels):
    """The authors' LLaVA code: the hidden state after the whole layer is the metric."""
    model = clip()
    seen = []
    plan = Pitome.plan

    def spy(self, signals, state, n_remove):
        seen.append((state.layer, signals["x"]))
        return plan(self, signals, state, n_remove)

    monkeypatch.setattr(Pitome, "plan", spy)
    tome_plus.patch(model, "pitome", keep=0.8)
    assert tome_plus.inspect(model).config["metric"] == "hidden"
    with torch.no_grad():
        model(pixels)
        x = model.pre_layrnorm(model.embeddings(pixels))
        expected = hf_clip.original_class(model.encoder.layers[0]).forward(model.encoder.layers[0], x, None)
    assert seen[0][0] == 0
    torch.testing.assert_close(seen[0][1], expected, rtol=1e-6, atol=1e-6)


def test_siglip_attention_pool_weighs_by_size():
    """Pooling merged tokens with log(size) on the probe's logits equals pooling the sequence in
    which every token appears size times."""
    model = siglip()
    tome_plus.patch(model, "tome", r=4)
    torch.manual_seed(2)
    tokens, size = torch.randn(1, 5, 64), torch.tensor([[1.0, 3.0, 1.0, 2.0, 4.0]])
    repeated = tokens.repeat_interleave(size[0].long(), dim=1)
    head = model.head
    state = tome_plus.state.TokenState(reducer=None, removals=(), n_prefix=0, has_cls=False, prop_attn=True,
                                       batch=1, n_input=11, size=size.unsqueeze(-1))
    token = hf_clip._SCOPE.set({"state": state})
    try:
        with torch.no_grad():
            pooled = head(tokens)
    finally:
        hf_clip._SCOPE.reset(token)
    with torch.no_grad():
        ref = hf_clip.original_class(head).forward(head, repeated)
    torch.testing.assert_close(pooled, ref, rtol=1e-5, atol=1e-5)


def test_tower_unpatch_restores_and_pickles(pixels):
    model = clip()
    with torch.no_grad():
        ref = model(pixels).last_hidden_state
    keys = list(model.state_dict())
    tome_plus.patch(model, "tome", r=8)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        out = model(pixels).last_hidden_state
        clone = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(clone(pixels).last_hidden_state, out)
        torch.testing.assert_close(copy.deepcopy(model)(pixels).last_hidden_state, out)
    tome_plus.unpatch(model)
    assert type(model) is CLIPVisionModel and type(model.encoder.layers[0]) is hf_clip.CLIPEncoderLayer
    assert not hasattr(model.encoder, "_tome_plus")
    with torch.no_grad():
        assert torch.equal(model(pixels).last_hidden_state, ref)


def test_tower_errors(pixels):
    model = clip()
    tome_plus.patch(model, "tome", r=4)
    with pytest.warns(UserWarning, match="attention maps are not recorded"):
        out = model(pixels, output_attentions=True)
    assert out.last_hidden_state.shape[1] < 65
    with pytest.raises(ValueError, match="metric"):
        tome_plus.patch(model, "pitome", metric="values")
    with pytest.raises(TypeError, match="has none to replace"):  # CLCA is for timm classifiers
        tome_plus.patch(model, "tome", r=4, head="clca")
    with pytest.raises(ValueError, match="this model has none; pass schedule="):  # no timm name to look up
        tome_plus.patch(model, "diffrate", flops=0.6)
    assert tome_plus.inspect(model).method == "tome" and tome_plus.inspect(model).head is None


# ----------------------------------------------------------------------------------------- LLaVA

def llava_embeddings(model, ids, pixels):
    """The unpatched LLaVA's language-model input: token embeddings with the image features at the
    placeholders (what its forward builds), for tests that restate an authors' LLM loop."""
    lm = model.model.language_model
    h = lm.embed_tokens(ids)
    feats = model.model.get_image_features(pixel_values=pixels).pooler_output
    h[ids == IMAGE_ID] = torch.cat(list(feats)).view(-1, h.shape[-1])
    return h


def assert_rows_alone(model, out, ids, shapes, pixels, new):
    """Each row of a left-padded batch's generation (`out`, from `ids`) equals its prompt alone
    (`prompts(shape)`, its own image) generating `new` tokens."""
    for row, shape in enumerate(shapes):
        ids1, mask1 = prompts(shape)
        with torch.no_grad():
            alone = model.generate(input_ids=ids1, attention_mask=mask1, pixel_values=pixels[row:row + 1],
                                   max_new_tokens=new, do_sample=False)
        assert torch.equal(alone[0, ids1.shape[1]:], out[row, ids.shape[1]:])


def greedy(model, ids, mask, pixels, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                              do_sample=False, **kwargs)


def test_llava_zero_budget_equals_unpatched(pixels):
    model = llava()
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    ref_tokens = greedy(model, ids, mask, pixels)
    tome_plus.patch(model, "tome", r=0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)
    assert torch.equal(greedy(model, ids, mask, pixels), ref_tokens)
    tome_plus.unpatch(model)
    assert type(model) is LlavaForConditionalGeneration


@pytest.mark.parametrize("method,options", METHODS)
def test_llava_fewer_image_tokens_and_cache_consistent(method, options, pixels):
    model = llava()
    tome_plus.patch(model, method, **options)
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    info = tome_plus.inspect(model)
    # layers 0-2 feed hidden_states[-2]; the last layer never reduces
    assert info.removals[3] == 0 and sum(info.removals) > 0
    n_image = info.tokens[2] - 1  # "default" drops the class token
    assert torch.equal(info.image_tokens, torch.full((2,), n_image))
    assert out.logits.shape[1] == ids.shape[1] - (N_IMAGE - n_image)
    cached = greedy(model, ids, mask, pixels)
    uncached = greedy(model, ids, mask, pixels, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :ids.shape[1]], ids)  # the caller's prompt comes back in front
    assert cached.shape[1] == ids.shape[1] + 5


@pytest.mark.parametrize("left", [True, False])
def test_llava_batch_rows_equal_rows_alone(left, pixels):
    """Different prompt lengths (left- or right-padded) and images per row: each row of a batch
    gives what it gives alone."""
    model = llava()
    tome_plus.patch(model, "tome", r=6)
    shapes, per_row = [(4, 6), (1, 1)], [1, 2]
    ids, mask = prompts(*shapes, left=left, images_per_row=per_row)
    images = torch.cat([pixels, pixels[:1]])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=images).logits
    start = 0
    for row, (shape, n) in enumerate(zip(shapes, per_row)):
        ids1, mask1 = prompts(shape, images_per_row=[n])
        with torch.no_grad():
            alone = model(input_ids=ids1, attention_mask=mask1, pixel_values=images[start:start + n]).logits[0]
        start += n
        rows = batch[row][-alone.shape[0]:] if left else batch[row][:alone.shape[0]]
        torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-4)
    if left:  # generation with the cache on the left-padded batch, row by row
        tokens = greedy(model, ids, mask, images)
        ids0, mask0 = prompts(shapes[1], images_per_row=[2])
        alone = greedy(model, ids0, mask0, images[1:])
        assert torch.equal(tokens[1, ids.shape[1]:], alone[0, ids0.shape[1]:])


def test_llava_labels_follow_the_tokens(pixels):
    model = llava()
    tome_plus.patch(model, "tome", r=6)
    ids, mask = prompts((3, 5), (3, 5))
    labels = torch.where(ids == IMAGE_ID, -100, ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    # the labels, cut as the prompt was: every text token in order, image positions ignored
    n_image = tome_plus.inspect(model).image_tokens[0].item()
    text = ids[0][ids[0] != IMAGE_ID]
    cut = torch.cat([text[:4], torch.full((n_image,), -100), text[4:]])
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 200), cut.repeat(2, 1)[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def test_llava_prompt_already_reduced_passes(pixels):
    model = llava()
    tome_plus.patch(model, "tome", r=6)
    ids, mask = prompts((3, 5), (3, 5))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        n_image = tome_plus.inspect(model).image_tokens[0].item()
        short_ids, short_mask = prompts((3, 5), (3, 5), n_image=n_image)
        short = model(input_ids=short_ids, attention_mask=short_mask, pixel_values=pixels).logits
    assert torch.equal(full, short)


@pytest.mark.parametrize("strategy,feature_layer", [("full", -1), ("default", [-3, -2])])
def test_llava_feature_layer_and_strategy(strategy, feature_layer, pixels):
    model = llava(strategy=strategy, feature_layer=feature_layer)
    tome_plus.patch(model, "tome", r=4)
    depth = 4 if feature_layer == -1 else 2  # reduce only before the first feature layer
    info = tome_plus.inspect(model)
    assert info.removals is None
    ids, mask = prompts((2, 2), (2, 2), n_image=N_IMAGE + (strategy == "full"))  # "full" keeps the class token
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    info = tome_plus.inspect(model)
    assert info.removals == (4,) * depth + (0,) * (4 - depth)
    expected = info.tokens[depth - 1] - (strategy == "default")
    assert torch.equal(info.image_tokens, torch.full((2,), expected))


def test_llava_siglip_tower(pixels):
    model = llava(strategy="full", feature_layer=-1, tower=SiglipVisionConfig)
    tome_plus.patch(model, "pitome", keep=0.8)
    ids, mask = prompts((2, 3), (4, 1))
    assert torch.equal(greedy(model, ids, mask, pixels), greedy(model, ids, mask, pixels, use_cache=False))
    assert tome_plus.inspect(model).image_tokens[0] < N_IMAGE


def test_llava_errors(pixels):
    model = llava()
    tome_plus.patch(model, "tome", r=4)
    ids, mask = prompts((3, 5), (3, 5), n_image=N_IMAGE - 3)
    with pytest.raises(ValueError, match="expected 64 per image"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    bad = llava()
    bad.model.vision_tower = torch.nn.Identity()
    with pytest.raises(TypeError, match="CLIP and SigLIP towers"):
        tome_plus.patch(bad, "tome", r=4)
    with pytest.raises(TypeError, match="HF CLIP/SigLIP towers and LLaVA"):
        tome_plus.patch(torch.nn.Linear(2, 2), "tome", r=4)


@pytest.mark.parametrize("method,options,budget", [("tome", {"r": 6}, 4), ("pitome", {"keep": 0.8}, 6)])
def test_tower_launches_and_no_sync(method, options, budget, monkeypatch, pixels):
    """As for timm (test_launches.py): few launches per reducing layer, no host sync."""
    from test_launches import launches
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    model = clip()
    base = launches(model, pixels, monkeypatch)
    tome_plus.patch(model, method, **options)
    patched = launches(model, pixels, monkeypatch)
    reducing = sum(1 for r in tome_plus.inspect(model).removals if r > 0)
    assert reducing == 4 and patched.syncs == []
    assert len(patched.ops) - len(base.ops) <= budget * reducing, patched.ops
    assert patched.ops.count("triton:_plan_kernel") == reducing


def test_tower_training_gradients(monkeypatch, pixels):
    """Gradients through merged tokens: the size channel's padded (fused) qkv gives the mask path's
    gradients, and HF gradient checkpointing gives the same again."""
    monkeypatch.setattr(tome_plus.reduce, "CHANNEL_DEVICES", frozenset({"cuda", "cpu"}))  # the GPU layout

    def grads(checkpointing=False, channel=True):
        monkeypatch.setattr(hf_clip, "SIZE_CHANNEL", channel)
        model = clip().train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        tome_plus.patch(model, "tome", r=6)
        model(pixels).last_hidden_state[:, :5].pow(2).sum().backward()
        return [model.encoder.layers[i].self_attn.q_proj.weight.grad for i in (0, 3)]

    ref = grads(channel=False)
    assert all(g is not None and g.abs().sum() > 0 for g in ref)
    for g, r in zip(grads(), ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads(checkpointing=True), ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_llava_example_runs():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "llava.py")], check=True, timeout=300,
                         capture_output=True, text=True, env=env).stdout
    assert "image placeholders in the prompt: 64" in out and "received: [40]" in out


def test_vipllava_multi_layer_features(pixels):
    """VipLlava concatenates several layers' features token by token: only the layers before the
    first feature layer reduce, so every selected layer holds the same tokens."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=200, pad_token_id=0)
    config = VipLlavaConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=text, image_token_id=IMAGE_ID,
                            vision_feature_layer=[-1, 2])
    model = VipLlavaForConditionalGeneration(config).eval()
    ids, mask = prompts((3, 5), (1, 2))
    ref = greedy(model, ids, mask, pixels)
    tome_plus.patch(model, "tome", r=0)
    assert torch.equal(greedy(model, ids, mask, pixels), ref)
    tome_plus.patch(model, "tome", r=6)
    assert torch.equal(greedy(model, ids, mask, pixels), greedy(model, ids, mask, pixels, use_cache=False))
    info = tome_plus.inspect(model)
    assert info.removals == (6, 6, 0, 0)  # hidden_states[2] is layer 1's output
    assert torch.equal(info.image_tokens, torch.full((2,), 65 - 12 - 1))


# ------------------------------------------------------------- LLaVA: what generate users rely on

def patched_llava(r=6):
    model = llava()
    tome_plus.patch(model, "tome", r=r)
    return model


def test_llava_keeps_forward_signature():
    """transformers reads the signature (logits_to_keep, mm_encoder_outputs) to decide what to pass."""
    import inspect
    model = patched_llava()
    params = inspect.signature(model.forward).parameters
    assert "logits_to_keep" in params and "mm_encoder_outputs" in params
    assert model._supports_logits_to_keep()


def test_llava_return_sequences_and_beams(pixels):
    model = patched_llava()
    ids, mask = prompts((3, 5), (1, 2))
    out = greedy(model, ids, mask, pixels, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 4 and torch.equal(out[:, :ids.shape[1]], ids.repeat_interleave(2, dim=0))
    best = greedy(model, ids, mask, pixels, num_beams=2)
    assert torch.equal(out[0::2], best)  # the first returned beam is the best one


def test_llava_equal_length_rows_different_image_counts(pixels):
    """Rows of equal length with 1 and 2 images differ after the cut: generate pads on the left,
    so every row's continuation equals the row's own."""
    model = patched_llava()
    images = torch.cat([pixels, pixels[:1]])
    ids, mask = prompts((N_IMAGE + 2, 3), (2, 3), images_per_row=[1, 2])
    assert bool(mask.all())  # no padding in the input
    batch = greedy(model, ids, None, images)
    for row, (n, sl) in enumerate([(1, slice(0, 1)), (2, slice(1, 3))]):
        alone = greedy(model, ids[row:row + 1], None, images[sl])
        assert torch.equal(batch[row], alone[0])


def test_llava_position_ids_renumbered(pixels):
    model = patched_llava()
    ids, mask = prompts((3, 5), (1, 2))
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        implicit = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        explicit = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    valid = torch.tensor([[True] * implicit.shape[1]] * 2)
    valid[1, :implicit.shape[1] - (mask[1].sum() - (N_IMAGE - tome_plus.inspect(model).image_tokens[1]))] = False
    torch.testing.assert_close(explicit[valid], implicit[valid], rtol=1e-5, atol=1e-5)


def test_llava_second_turn_with_the_cache(pixels):
    """Turn 2 passes the whole conversation (with the processor's image runs) and turn 1's cache:
    it continues as a fresh run over that conversation does."""
    model = patched_llava()
    ids, mask = prompts((3, 5), (3, 5))
    with torch.no_grad():
        first = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                               do_sample=False, return_dict_in_generate=True)
        follow = torch.cat([first.sequences, torch.tensor([[60, 61]] * 2)], dim=1)
        follow_mask = torch.ones_like(follow)
        second = model.generate(input_ids=follow, attention_mask=follow_mask, cache=first.cache, max_new_tokens=3,
                                do_sample=False)
        fresh = model.generate(input_ids=follow, attention_mask=follow_mask, pixel_values=pixels, max_new_tokens=3,
                               do_sample=False)
    assert torch.equal(second, fresh)


def test_llava_manual_loop_with_uncut_mask_is_refused(pixels):
    model = patched_llava()
    ids, mask = prompts((3, 5), (3, 5))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        grown = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)  # the processor's mask, grown
        with pytest.raises(ValueError, match="the cache holds"):
            model(input_ids=step, attention_mask=grown, cache=out.cache)


def test_llava_max_length_counts_the_callers_prompt(pixels):
    model = patched_llava()
    ids, mask = prompts((3, 5), (3, 5))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_length=ids.shape[1] + 4,
                             do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_llava_max_length_of_any_generation_config_counts_the_callers_prompt(pixels):
    """The model's own generation_config and one passed to generate count the caller's prompt too."""
    import copy
    model = patched_llava()
    ids, mask = prompts((3, 5), (3, 5))
    model.generation_config.max_length, model.generation_config.max_new_tokens = ids.shape[1] + 4, None
    config = copy.deepcopy(model.generation_config)
    config.max_length = ids.shape[1] + 3
    with torch.no_grad():
        own = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False)
        passed = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                                generation_config=config)
    assert own.shape[1] == ids.shape[1] + 4 and passed.shape[1] == ids.shape[1] + 3
    assert model.generation_config.max_length == ids.shape[1] + 4 and config.max_length == ids.shape[1] + 3


def test_llava_inner_model_and_precomputed_features(pixels):
    model = patched_llava()
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        inner = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
        features = model.model.get_image_features(pixel_values=pixels)
        pre = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": features}).logits
    torch.testing.assert_close(model.lm_head(inner), ref)
    torch.testing.assert_close(pre, ref)


def test_llava_padded_labels_of_different_lengths(pixels):
    model = patched_llava()
    ids, mask = prompts((6, 5), (1, 2), left=False)
    labels = torch.where((ids == IMAGE_ID) | (mask == 0), -100, ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        n_image = tome_plus.inspect(model).image_tokens
        losses = []
        for row, shape in enumerate([(6, 5), (1, 2)]):
            ids1, mask1 = prompts(shape)
            labels1 = torch.where(ids1 == IMAGE_ID, -100, ids1)
            one = model(input_ids=ids1, attention_mask=mask1, pixel_values=pixels[row:row + 1], labels=labels1)
            losses.append((one.loss, int((labels1 != -100).sum()) - 1))
    total = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    torch.testing.assert_close(out.loss, total, rtol=1e-4, atol=1e-5)
    assert torch.equal(n_image, torch.full((2,), n_image[0].item()))


def test_llava_atp_with_tower_pickles_and_unpatches_whole(pixels):
    """ATP with a tower method: one record undoes both (`unpatch`, `refresh`); a copy runs alike,
    without the last forward's tensors."""
    model = llava()
    classes = {name: type(m) for name, m in model.named_modules()}
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2], tower={"method": "tome", "r": 6})
    ids, mask = prompts((3, 5), (1, 2))
    pickled = pickle.loads(pickle.dumps(model))  # before a forward: transformers' hooks do not pickle
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for clone in (pickled, copy.deepcopy(model)):
            assert tome_plus.inspect(clone).llm_kept is None and tome_plus.inspect(clone).image_tokens is None
            assert torch.equal(clone(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, out)
            for field in ("llm_kept", "image_tokens", "tokens"):
                assert torch.equal(torch.as_tensor(getattr(tome_plus.inspect(clone), field)),
                                   torch.as_tensor(getattr(tome_plus.inspect(model), field)))
    tome_plus.refresh(model)
    tome_plus.unpatch(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not any(hasattr(m, "_tome_plus") for m in model.modules())


def test_llava_collecting_runs_soft_masks(pixels):
    from tome_plus.llm import context
    model = llava()
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    ids, mask = prompts((3, 5), (1, 2))
    labels = torch.where((ids == IMAGE_ID) | (mask == 0), -100, ids)
    with context.collecting() as collected:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert len(collected) == 1 and collected[0].soft and collected[0].kept_fraction.shape == (2,)
    assert torch.equal(collected[0].answer, labels != -100)  # the forward's labels reached the LLM side
    assert context.CALL.get().collect is None  # nothing collected outside the block
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert len(collected) == 1
