"""LLM-side pruning (ATP, FastV, PyramidDrop, SparseVLM) on anyres LLaVA models: LLaVA-NeXT and LLaVA-OneVision, tiny
random weights. Their image runs each have a length of their own (crops packed with newline
tokens), so only the language model prunes; the tower site is refused by name."""
import math

import pytest
import torch

pytest.importorskip("transformers", reason='VLM tests need transformers: pip install -e ".[hf]"')

import tome_plus  # noqa: E402
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,  # noqa: E402
                          LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                          SiglipVisionConfig)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches  # noqa: E402

IMAGE_ID, VIDEO_ID = 199, 198
TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=200, pad_token_id=0)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
SIZES = torch.tensor([[40, 70], [64, 30]])  # two images of different shapes: runs of different lengths


def llava_next():
    torch.manual_seed(0)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=LlamaConfig(**TEXT),
                             image_token_id=IMAGE_ID, image_grid_pinpoints=PINPOINTS)
    return no_eos(LlavaNextForConditionalGeneration(config).eval())


def onevision():
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**TOWER), text_config=Qwen2Config(**TEXT),
                                  image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, image_grid_pinpoints=PINPOINTS,
                                  vision_feature_layer=-1)
    return no_eos(LlavaOnevisionForConditionalGeneration(config).eval())


def no_eos(model):
    model.generation_config.eos_token_id = None  # every row generates all its tokens: rows compare whole
    return model


FAMILIES = {"llava_next": llava_next, "onevision": onevision}


def images(model):
    """Pixel values of the two images (crops padded to the larger count, as the processor does)
    and each image's placeholder count, as the model itself makes them."""
    torch.manual_seed(1)
    n = max(image_size_to_num_patches(tuple(s.tolist()), PINPOINTS, 32) for s in SIZES)
    pixels = torch.randn(len(SIZES), n, 3, 32, 32)
    with torch.no_grad():
        features = model.model.get_image_features(pixels, SIZES, return_dict=True).pooler_output
    return pixels, [f.shape[0] for f in features]


def batch(counts, shapes=((3, 5), (1, 2))):
    """Row i: `[BOS, pre..., <image> x counts[i], post...]`, left-padded with 0."""
    rows = [[1] + list(range(10, 10 + pre)) + [IMAGE_ID] * n + list(range(50, 50 + post))
            for n, (pre, post) in zip(counts, shapes)]
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def greedy(model, ids, mask, pixels, sizes, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                              max_new_tokens=5, do_sample=False, **kwargs)


METHODS = [("fastv", {"keep": 0.5}), ("fastv", {"tokens": 10}), ("atp", {"keep": 0.5, "layers": [0, 2]}),
           ("pyramiddrop", {"keep": 0.5, "layers": [1, 2]}), ("sparsevlm", {"scale": 1.0, "layers": [0, 2]})]
# what keeps every visual token (SparseVLM's count is rank x scale: a scale past any count)
EVERYTHING = {"sparsevlm": {"scale": 1000.0}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "atp", "pyramiddrop", "sparsevlm"])
def test_keeping_everything_gives_the_unpatched_tokens(family, method):
    model = FAMILIES[family]()
    pixels, counts = images(model)
    ids, mask = batch(counts)
    ref = greedy(model, ids, mask, pixels, SIZES)
    tome_plus.patch(model, method, **EVERYTHING.get(method, {"keep": 1.0}))
    assert torch.equal(greedy(model, ids, mask, pixels, SIZES), ref)
    assert torch.equal(tome_plus.inspect(model).llm_kept[0], torch.tensor(counts))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", METHODS)
def test_cache_batch_and_unpatch(family, method, options):
    """Pruning: generate with the cache equals generation without it, a left-padded batch of
    images of different sizes equals each row alone, FastV keeps its count of each row's visual
    tokens, and unpatch restores the unpatched tokens."""
    model = FAMILIES[family]()
    pixels, counts = images(model)
    ids, mask = batch(counts)
    ref = greedy(model, ids, mask, pixels, SIZES)
    tome_plus.patch(model, method, **options)
    out = greedy(model, ids, mask, pixels, SIZES)
    kept = tome_plus.inspect(model).llm_kept[0]
    if method == "fastv":
        want = [math.ceil(0.5 * n) if "keep" in options else min(options["tokens"], n) for n in counts]
        assert kept.tolist() == want
    assert bool((kept < torch.tensor(counts)).all())
    assert torch.equal(greedy(model, ids, mask, pixels, SIZES, use_cache=False), out)
    for row in range(2):
        alone_ids, alone_mask = batch([counts[row]], [((3, 5), (1, 2))[row]])
        alone = greedy(model, alone_ids, alone_mask, pixels[row:row + 1], SIZES[row:row + 1])
        assert torch.equal(alone[0], out[row, -alone.shape[1]:])
    tome_plus.unpatch(model)
    assert torch.equal(greedy(model, ids, mask, pixels, SIZES), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_methods_and_atp_tokens_are_refused_by_name(family):
    model = FAMILIES[family]()
    name = type(model).__name__
    for method, options in (("tome", {"r": 2}), ("pitome", {"keep": 0.9}), ("zero_tprune", {"keep": 0.9})):
        with pytest.raises(ValueError, match=f"{name} .*vision tower.*site='features'.*'atp', 'fastv'"):
            tome_plus.patch(model, method, site="tower", **options)
    with pytest.raises(ValueError, match="tokens=.*use keep="):
        tome_plus.patch(model, "atp", tokens=10)


@pytest.mark.parametrize("method,options", [("fastv", {"keep": 0.5}), ("atp", {"keep": 0.5, "layers": [0, 2]})])
def test_onevision_video_tokens_are_visual(method, options):
    """OneVision's video placeholders are pruned like image tokens: keeping everything gives the
    unpatched tokens; pruning, the cache changes nothing."""
    model = onevision()
    torch.manual_seed(2)
    video = torch.randn(1, 4, 3, 32, 32)  # 4 frames
    with torch.no_grad():
        n = model.model.get_video_features(video, return_dict=True).pooler_output.shape[1]
    ids = torch.tensor([[1, 10, 11] + [VIDEO_ID] * n + [50, 51, 52]])
    mask = torch.ones_like(ids)
    run = lambda **k: model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=video, max_new_tokens=5,
                                     do_sample=False, **k)
    with torch.no_grad():
        ref = run()
        tome_plus.patch(model, method, keep=1.0)
        assert torch.equal(run(), ref)
        tome_plus.unpatch(model)
        tome_plus.patch(model, method, **options)
        out = run()
        kept = int(tome_plus.inspect(model).llm_kept[0, 0])
        assert kept < n and (method != "fastv" or kept == math.ceil(0.5 * n))
        assert torch.equal(run(use_cache=False), out)


# ------------------------------------------------- every family, with processor-exact prompts (vlm_models)

import vlm_models as V  # noqa: E402

LINEAR = ("qwen3_5", "qwen3_5_moe")  # linear-attention layers: LLM methods refused (tests/test_qwen3_5.py)
CASES = [(family, "image") for family in V.FACTORIES if family not in LINEAR] + [
    ("qwen2_vl", "video"), ("qwen2_5_vl", "video"), ("qwen3_vl", "video"), ("internvl", "video")]


@pytest.mark.parametrize("family,kind", CASES)
@pytest.mark.parametrize("method,options", [("fastv", {"keep": 0.5}), ("atp", {"keep": 0.5, "layers": [0, 2]}),
                                            ("pyramiddrop", {"keep": 0.5, "layers": [1, 2], "positions": "kept"}),
                                            ("sparsevlm", {"scale": 1.0, "layers": [0, 2], "positions": "kept"})])
def test_every_family_prunes_in_its_llm_as_unpatched_would_run(family, kind, method, options):
    """LLaVA-NeXT, NeXT-Video, OneVision, Qwen2-VL, Qwen2.5-VL (M-RoPE positions), images of two
    sizes or videos, a left-padded batch: keeping everything gives the unpatched greedy tokens;
    pruning keeps fewer visual tokens per row, the cache changes nothing, each row equals itself
    alone, and unpatch restores."""
    model = V.FACTORIES[family](text_config={"num_hidden_layers": 4})
    model.generation_config.eos_token_id = None
    rows = ([3, kind, 5], [1, kind, 2])
    video = (4, 32, 32) if family.startswith("qwen") else 4  # (frames, H, W), or frames of the tile size
    inputs = (V.INPUTS[family](model, rows=rows) if kind == "image"
              else V.INPUTS[family](model, rows=rows, image_sizes=(), videos=(video, video)))
    visual = ((inputs["input_ids"] == V.IMAGE_ID) | (inputs["input_ids"] == V.VIDEO_ID)).sum(1)
    ref = V.greedy(model, inputs, 5)
    tome_plus.patch(model, method, **EVERYTHING.get(method, {"keep": 1.0}),
                    **{k: v for k, v in options.items() if k == "positions"})
    assert torch.equal(V.greedy(model, inputs, 5), ref)
    assert torch.equal(tome_plus.inspect(model).llm_kept[0], visual)
    tome_plus.unpatch(model)
    tome_plus.patch(model, method, **options)
    out = V.greedy(model, inputs, 5)
    kept = tome_plus.inspect(model).llm_kept[0]
    assert bool((kept < visual).all())
    if method == "fastv":
        assert kept.tolist() == [math.ceil(0.5 * int(n)) for n in visual]
    assert torch.equal(V.greedy(model, inputs, 5, use_cache=False), out)
    for row in range(2):
        assert torch.equal(V.greedy(model, V.take_row(inputs, row), 5)[0], out[row])
    tome_plus.unpatch(model)
    assert torch.equal(V.greedy(model, inputs, 5), ref)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next_video", "qwen3_vl", "qwen3_5", "gemma3",
                                    "internvl"])
def test_tower_methods_refused_on_the_other_families(family):
    model = V.FACTORIES[family]()
    with pytest.raises(ValueError, match=f"{type(model).__name__} .*vision tower.*site='features'"):
        tome_plus.patch(model, "tome", r=2, site="tower")


def test_fastv_tokens_above_an_images_count_are_refused_or_warned_once():
    """timm's rule for FastV's `tokens=N` per image: above LLaVA-1.5's known count it is refused at
    patch; on LLaVA-NeXT, whose counts depend on the image, the forward warns once per patch and
    keeps every visual token (the unpatched greedy tokens)."""
    from test_hf import N_IMAGE, llava
    with pytest.raises(ValueError, match=f"tokens={N_IMAGE + 1} is more than the {N_IMAGE} image tokens"):
        tome_plus.patch(llava(), "fastv", k=1, tokens=N_IMAGE + 1)
    model = V.FACTORIES["llava_next"](text_config={"num_hidden_layers": 4})
    model.generation_config.eos_token_id = None
    inputs = V.INPUTS["llava_next"](model)
    visual = (inputs["input_ids"] == V.IMAGE_ID).sum(1)
    ref = V.greedy(model, inputs, 3)
    tome_plus.patch(model, "fastv", k=1, tokens=10000)
    with pytest.warns(UserWarning) as record:
        out = V.greedy(model, inputs, 3)
        V.greedy(model, inputs, 3)
    [warning] = [w for w in record if "tokens=" in str(w.message)]
    assert "tokens=10000 per image is more than row" in str(warning.message)
    assert torch.equal(out, ref) and torch.equal(tome_plus.inspect(model).llm_kept[0], visual)


def test_an_llm_method_is_one_class_and_a_registry_line():
    """A method written against `LlmReducer` alone (FastV's paper rule re-expressed: the prompt's
    mean attention after the first layer, the top half of the visual tokens kept) runs through the
    one decoder loop and equals `fastv` token for token, with no other file touched."""
    from dataclasses import dataclass
    from typing import ClassVar, Dict

    from tome_plus.methods import base
    from tome_plus.methods.atp import top_fraction

    @dataclass
    class HalfConfig(base.ReductionConfig):
        default_budget: ClassVar[Dict[str, object]] = {"keep": 0.5}
        default_prop_attn: ClassVar[bool] = False

    class MeanHalf(base.LlmReducer):
        name = "test_mean_half"
        config_class = HalfConfig

        def sites(self, depth):
            return [0]

        def query_weights(self, visual, instruction, valid, prompt):
            q = (prompt & valid).float()
            return (q / q.sum(dim=1, keepdim=True)).unsqueeze(1)

        def select(self, site):
            score = torch.where(site.visual, site.received[:, 0], torch.zeros_like(site.received[:, 0]))
            return top_fraction(score, site.candidates, self.config.keep)

    base.register(MeanHalf)
    try:
        outs = {}
        for method, options in (("test_mean_half", {}), ("fastv", {"k": 1, "keep": 0.5})):
            model = llava_next()
            pixels, counts = images(model)
            ids, mask = batch(counts)
            tome_plus.patch(model, method, **options)
            outs[method] = (greedy(model, ids, mask, pixels, SIZES), tome_plus.inspect(model).llm_kept)
    finally:
        base.REGISTRY.unregister("test_mean_half")
    (mine, my_kept), (theirs, their_kept) = outs.values()
    assert torch.equal(mine, theirs) and torch.equal(my_kept[0], their_kept[0])
    assert my_kept[0].tolist() == [math.ceil(0.5 * n) for n in counts]
