"""site="features": a vision method (tome, pitome, zero_tprune, divprune, visionzip) reduces each image's (or video's)
features before the language model's first layer, on every supported VLM family."""
import pytest
import torch

pytest.importorskip("transformers")

import tome_plus  # noqa: E402
import vlm_models as V  # noqa: E402
from naive import naive_bipartite_merge  # noqa: E402
from test_hf import IMAGE_ID, N_IMAGE, llava, pixels, prompts  # noqa: E402,F401

VIDEO_FAMILIES = ("llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
                  "qwen3_5", "internvl")
CASES = ([(family, "image") for family in V.FACTORIES] + [(family, "video") for family in VIDEO_FAMILIES])
METHODS = [("tome", {"keep": 0.3}), ("pitome", {"keep": 0.6}), ("zero_tprune", {"tokens": 5}),
           ("divprune", {"keep": 0.4}), ("visionzip", {"tokens": 6})]


def model_and_inputs(family, kind, rows=([3, "{kind}", 5], [1, "{kind}", 2])):
    model = V.FACTORIES[family](text_config={"num_hidden_layers": 4})
    model.generation_config.eos_token_id = None
    rows = [[kind if item == "{kind}" else item for item in row] for row in rows]
    if kind == "image":
        return model, V.INPUTS[family](model, rows=rows)
    n_videos = sum(item == "video" for row in rows for item in row)
    # Qwen3-VL runs each temporal patch apart: 48 px frames give it 9 tokens per run
    side = 48 if family.startswith("qwen3") else 32
    videos = ((4, side, side),) * n_videos if family.startswith("qwen") else (4,) * n_videos
    return model, V.INPUTS[family](model, rows=rows, image_sizes=(), videos=videos)


def visual_counts(inputs):
    ids = inputs["input_ids"]
    return ((ids == V.IMAGE_ID) | (ids == V.VIDEO_ID)).sum(dim=1)


@pytest.mark.parametrize("family,kind", CASES)
@pytest.mark.parametrize("method,options", METHODS)
def test_every_family_reduces_its_features(family, kind, method, options):
    """Keeping everything gives the unpatched greedy tokens; reducing keeps fewer visual tokens in
    every row, generation with the cache equals generation without it, each row of the left-padded
    batch equals itself alone, and unpatch restores. (Qwen3.5's first layer forms no attention:
    the methods reading it are refused there, tests/test_qwen3_5.py.)"""
    if family.startswith("qwen3_5") and method in ("zero_tprune", "visionzip"):
        pytest.skip("refused by name on a linear-attention first layer")
    model, inputs = model_and_inputs(family, kind)
    visual = visual_counts(inputs)
    ref = V.greedy(model, inputs, 5)
    tome_plus.patch(model, method, site="features", keep=1.0)
    assert torch.equal(V.greedy(model, inputs, 5), ref)
    report = tome_plus.inspect(model)
    assert torch.equal(report.image_tokens, visual) and torch.equal(report.llm_kept[0], visual)
    tome_plus.patch(model, method, site="features", **options)
    out = V.greedy(model, inputs, 5)
    kept = tome_plus.inspect(model).llm_kept[0]
    assert bool((kept < visual).all()), (kept, visual)
    assert torch.equal(V.greedy(model, inputs, 5, use_cache=False), out)
    for row in range(2):
        assert torch.equal(V.greedy(model, V.take_row(inputs, row), 5)[0], out[row])
    tome_plus.unpatch(model)
    assert type(model) is type(V.FACTORIES[family]())
    assert torch.equal(V.greedy(model, inputs, 5), ref)


def llm_inputs(model, inputs):
    """What the unpatched model hands its language model: embeddings (features scattered in) and
    position ids (Qwen's M-RoPE rows)."""
    got = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    embeds, positions = got["inputs_embeds"][0], got.get("position_ids")
    if positions is None:  # the language model counts from 0
        positions = torch.arange(embeds.shape[0]).unsqueeze(0)
    if got.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: `[L, levels * D]` at the visual positions
        deep = embeds.new_zeros(embeds.shape[0], len(got["deepstack_visual_embeds"]) * embeds.shape[1])
        deep[got["visual_pos_masks"][0]] = torch.cat(got["deepstack_visual_embeds"], dim=-1)
        return embeds, positions, deep
    return embeds, positions


def last_logits_deepstack(model, embeds, positions, deep, visual):
    """The unpatched Qwen3-VL language model on `embeds` with the DeepStack features `deep`
    (`[L, levels * D]`) of the visual tokens `visual`."""
    levels = deep.shape[1] // embeds.shape[1]
    features = [part[visual] for part in deep.chunk(levels, dim=1)]
    with torch.no_grad():
        h = model.model.language_model(inputs_embeds=embeds.unsqueeze(0), position_ids=positions,
                                       visual_pos_masks=visual.unsqueeze(0),
                                       deepstack_visual_embeds=features).last_hidden_state
        return model.lm_head(h[:, -1])


def last_logits(model, embeds, positions):
    with torch.no_grad():
        h = model.model.language_model(inputs_embeds=embeds.unsqueeze(0), position_ids=positions).last_hidden_state
        return model.lm_head(h[:, -1])


def naive_features(embeds, ids, newline, n_keep, carry=None):
    """Each image's run of placeholders, newlines aside, merged to `n_keep` tokens by repeated
    bipartite matching on the features themselves (each step at most half), the merged token
    at its destination's place: `(embeddings, kept input positions)` in position order. With
    `carry` (`[L, C]`, DeepStack's features), the merged carry comes third: the same groups, sizes."""
    width = embeds.shape[1]
    if carry is not None:
        embeds = torch.cat([embeds, carry], dim=1)
    visual = (ids == V.IMAGE_ID) | (ids == V.VIDEO_ID)
    if newline is not None:
        is_newline = (embeds == newline).all(dim=-1)
    else:
        is_newline = torch.zeros_like(visual)
    out = {i: embeds[i] for i in range(len(ids)) if not visual[i] or is_newline[i]}
    i = 0
    while i < len(ids):
        if not visual[i]:
            i += 1
            continue
        j = i
        while j < len(ids) and visual[j]:
            j += 1
        members = [p for p in range(i, j) if not is_newline[p]]
        x, size = embeds[members], torch.ones(len(members))
        while len(members) > n_keep:
            r = min(len(members) - n_keep, len(members) // 2)
            x, size, groups = naive_bipartite_merge(x, size, x[:, :width], r, 0)
            members = [members[g[0]] for g in groups]  # a group stands at its destination's place
        out.update(zip(members, x))
        i = j
    order = sorted(out)
    x = torch.stack([out[p] for p in order])
    if carry is not None:
        return x[:, :width], torch.tensor(order), x[:, width:]
    return x, torch.tensor(order)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl", "qwen3_5", "internvl"])
def test_tome_features_equal_a_naive_reference(family):
    """One row: the patched logits equal the unpatched language model run on the embeddings a
    plain loop merges (LLaVA-NeXT's newlines kept, Qwen's t/h/w rotary rows kept per token,
    Qwen3-VL's DeepStack features merged in the same groups with the same sizes)."""
    model, inputs = model_and_inputs(family, "image", rows=([2, "image", 3, "image", 4],))
    embeds, positions, *deep = llm_inputs(model, inputs)
    newline = getattr(model.model, "image_newline", None)
    x, kept, *merged = naive_features(embeds, inputs["input_ids"][0], newline, n_keep=5, carry=(deep or [None])[0])
    if deep:
        visual = (inputs["input_ids"][0] == V.IMAGE_ID)[kept]
        want = last_logits_deepstack(model, x, positions[..., kept], merged[0], visual)
        without = last_logits(model, x, positions[..., kept])
        assert not torch.allclose(without, want, atol=1e-3)  # the DeepStack features matter here
    else:
        want = last_logits(model, x, positions[..., kept])
    tome_plus.patch(model, "tome", site="features", tokens=5)
    with torch.no_grad():
        got = model(**inputs).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    n_newlines = int((embeds == newline).all(-1).sum()) if newline is not None else 0
    assert tome_plus.inspect(model).llm_kept[0].tolist() == [2 * 5 + n_newlines]
    if positions.dim() == 2:  # 1-D positions: inspect names the kept ones
        report = tome_plus.inspect(model).llm_positions[0][0]
        visual = ((inputs["input_ids"][0] == V.IMAGE_ID)[kept])
        assert report[report >= 0].tolist() == positions[0, kept].tolist()
        assert int(visual.sum()) == 2 * 5 + n_newlines


def test_zero_tprune_prunes_rows_of_the_unpatched_embeddings():
    """Pruning: the kept tokens are the unpatched embeddings at their own positions, with exactly
    `tokens` per image (newlines aside), and the logits are the unpatched LLM's on them."""
    model, inputs = model_and_inputs("llava_next", "image", rows=([2, "image", 3, "image", 1],))
    embeds, positions = llm_inputs(model, inputs)
    tome_plus.patch(model, "zero_tprune", site="features", tokens=4)
    with torch.no_grad():
        got = model(**inputs).logits[:, -1]
    kept = tome_plus.inspect(model).llm_positions[0][0]
    kept = kept[kept >= 0]
    ids = inputs["input_ids"][0]
    newline = (embeds == model.model.image_newline).all(-1)
    reducible = (ids == V.IMAGE_ID) & ~newline
    assert int(reducible[kept].sum()) == 2 * 4
    assert bool(((ids != V.IMAGE_ID) | newline)[kept].sum() == ((ids != V.IMAGE_ID) | newline).sum())
    torch.testing.assert_close(got, last_logits(model, embeds[kept], positions[..., kept]), rtol=1e-4, atol=1e-4)


def test_packed_positions_number_the_kept_tokens_consecutively():
    """positions="packed": the same kept tokens as "kept", numbered 0, 1, ... (as vLLM places a
    shorter image); the logits are the unpatched LLM's on the kept embeddings at consecutive
    positions."""
    model, inputs = model_and_inputs("llava_next", "image", rows=([2, "image", 3, "image", 1],))
    embeds, _ = llm_inputs(model, inputs)
    tome_plus.patch(model, "zero_tprune", site="features", tokens=4)
    with torch.no_grad():
        model(**inputs)
    kept = tome_plus.inspect(model).llm_positions[0][0]
    kept = kept[kept >= 0]
    tome_plus.patch(model, "zero_tprune", site="features", tokens=4, positions="packed")
    with torch.no_grad():
        got = model(**inputs).logits[:, -1]
    assert torch.equal(tome_plus.inspect(model).llm_positions[0][0], torch.arange(len(kept)))
    want = last_logits(model, embeds[kept], torch.arange(len(kept)).unsqueeze(0))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static", "none"])
def test_packed_positions_generate_as_the_reduced_prompt(cache, pixels):
    """Decoding after a packed prompt goes on from the kept count: a left-padded LLaVA batch's
    greedy tokens equal the unpatched model's `generate` on the kept embeddings alone."""
    model = llava()
    ids, mask = prompts((3, 5), (1, 2))
    tome_plus.patch(model, "zero_tprune", site="features", tokens=16, positions="packed")
    options = {"dynamic": {}, "static": {"cache_implementation": "static"}, "none": {"use_cache": False}}[cache]
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                             do_sample=False, output_hidden_states=True, output_scores=True, return_dict_in_generate=True,
                             **options)
    kept = got.hidden_states[0][1].abs().sum(-1) != 0  # after layer 0: zeros where a token was reduced
    assert torch.equal(kept.sum(1), mask.sum(1) - (N_IMAGE - 16))
    tome_plus.unpatch(model)
    with torch.no_grad():
        embeds = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True
                       ).hidden_states[0]
    width = int(kept.sum(1).max())
    rows = [embeds[b][kept[b]] for b in range(2)]
    reduced = torch.stack([torch.cat([r.new_zeros(width - len(r), r.shape[-1]), r]) for r in rows])
    reduced_mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    with torch.no_grad():
        want = model.generate(inputs_embeds=reduced, attention_mask=reduced_mask, max_new_tokens=5, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences[:, ids.shape[1]:], want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_llava_15_features_site_and_default_sites():
    """LLaVA-1.5: the tower is the default site of a vision method, the features site reduces
    each image's run (adjacent images apart) to its budget; the packed families default to the
    features site, LLM methods to the LLM."""
    model = llava()
    ids, mask = prompts((3, 5), (1, 2), images_per_row=[1, 2])
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                             do_sample=False)
    tome_plus.patch(model, "tome", r=4)
    assert tome_plus.backends.base.get_info(model).parts.site == "tower"
    tome_plus.patch(model, "tome", site="features", r=0)
    with torch.no_grad():
        same = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                              do_sample=False)
    assert torch.equal(same, ref)
    tome_plus.patch(model, "tome", site="features", tokens=10)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                do_sample=False)
        uncached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                  do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert tome_plus.inspect(model).llm_kept[0].tolist() == [10, 20]  # two adjacent images: 10 each
    assert tome_plus.inspect(model).image_tokens.tolist() == [(ids[0] == IMAGE_ID).sum(), (ids[1] == IMAGE_ID).sum()]
    for family in ("llava_next", "qwen2_vl"):
        packed = V.FACTORIES[family]()
        tome_plus.patch(packed, "pitome", keep=0.8)
        assert tome_plus.backends.base.get_info(packed).parts.site == "features"
        tome_plus.patch(packed, "fastv", keep=0.5, k=1)
        assert tome_plus.backends.base.get_info(packed).parts.site == "llm"


def test_site_errors_name_the_fix():
    model = V.llava_next()
    with pytest.raises(ValueError, match="site must be one of 'tower', 'features', 'llm'"):
        tome_plus.patch(model, "tome", site="decoder", r=2)
    with pytest.raises(ValueError, match="prunes inside the language model: site='llm'"):
        tome_plus.patch(model, "fastv", site="features", keep=0.5)
    with pytest.raises(ValueError, match="site='tower' or 'features'"):
        tome_plus.patch(model, "tome", site="llm", r=2)
    for options in ({"flops": 0.5}, {}):  # the site is named before DiffRate asks for its budget
        with pytest.raises(ValueError, match="site='features' runs divprune, pitome, tome, visionzip, zero_tprune, not 'diffrate'"):
            tome_plus.patch(model, "diffrate", site="features", **options)
    with pytest.raises(ValueError, match="give tokens= .*not flops=0.5"):
        tome_plus.patch(model, "tome", site="features", flops=0.5)
    with pytest.raises(ValueError, match="not r=\\[1, 2\\]"):
        tome_plus.patch(model, "tome", site="features", r=[1, 2])
    with pytest.raises(ValueError, match="layers= names blocks"):
        tome_plus.patch(model, "zero_tprune", site="features", tokens=4, layers=[0])
    with pytest.raises(ValueError, match="trace_source"):
        tome_plus.patch(model, "tome", site="features", r=2, trace_source=True)
    with pytest.raises(ValueError, match="positions must be one of 'kept', 'packed', got 'gaps'"):
        tome_plus.patch(model, "tome", site="features", r=2, positions="gaps")
    with pytest.raises(ValueError, match="positions='packed' places the kept tokens of site='features'.*site='tower'"):
        tome_plus.patch(llava(), "tome", site="tower", r=2, positions="packed")
    with pytest.raises(ValueError, match="M-RoPE positions .* are not packed yet"):
        tome_plus.patch(V.qwen2_vl(), "tome", site="features", keep=0.5, positions="packed")
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    with pytest.raises(TypeError, match="site='features' places a method in a vision-language model"):
        tome_plus.patch(vit, "tome", site="features", r=2)
    with pytest.raises(ValueError, match="positions='packed' places the kept tokens of site='features'"):
        tome_plus.patch(vit, "tome", r=2, positions="packed")


def test_small_images_keep_a_token_and_newlines_survive_autocast():
    """keep=0.1 of an 8-token image keeps one token (not zero); under bf16 autocast LLaVA-NeXT's
    newlines, rounded to bf16 by the projector's dtype, are still recognised and kept."""
    model, inputs = model_and_inputs("qwen2_vl", "image")
    tome_plus.patch(model, "tome", site="features", keep=0.1)
    V.greedy(model, inputs, 2)
    assert tome_plus.inspect(model).llm_kept[0].tolist() == [1, 1]
    model, inputs = model_and_inputs("llava_next", "image", rows=([2, "image", 3, "image", 1],))
    embeds, _ = llm_inputs(model, inputs)
    n_newlines = int((embeds == model.model.image_newline).all(-1).sum())
    assert n_newlines > 0
    tome_plus.patch(model, "tome", site="features", tokens=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)
    assert tome_plus.inspect(model).llm_kept[0].tolist() == [2 + n_newlines]


def tokens_warnings(record):
    return [w for w in record if "tokens=" in str(w.message)]


def test_tokens_above_an_images_count_are_refused_or_warned_once():
    """timm's rule: where one image's count is known (LLaVA-1.5) `tokens=N` above it is refused at
    patch, naming the count; where it depends on the image (LLaVA-NeXT's tiles) the forward warns
    once per patch and keeps every token, as the unpatched model does."""
    with pytest.raises(ValueError, match=f"tokens={N_IMAGE + 1} is more than the {N_IMAGE} image tokens"):
        tome_plus.patch(llava(), "tome", site="features", tokens=N_IMAGE + 1)
    tome_plus.patch(llava(), "tome", site="features", tokens=N_IMAGE)  # every token: reachable
    model, inputs = model_and_inputs("llava_next", "image")
    ref = V.greedy(model, inputs, 3)
    tome_plus.patch(model, "tome", site="features", tokens=10000)
    with pytest.warns(UserWarning) as record:
        out = V.greedy(model, inputs, 3)
        V.greedy(model, inputs, 3)
    [warning] = tokens_warnings(record)
    assert "tokens=10000 is more than the" in str(warning.message) and "site='features'" in str(warning.message)
    assert torch.equal(out, ref) and torch.equal(tome_plus.inspect(model).llm_kept[0], visual_counts(inputs))


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl"])
def test_inspect_reports_the_newlines_apart(family):
    """`tokens=N` counts each image's reduced tokens; LLaVA-NeXT's and OneVision's newlines come on
    top, never reduced, and inspect reports them apart: `llm_kept[0] - llm_newlines` is N per image."""
    model, inputs = model_and_inputs(family, "image", rows=([2, "image", 3, "image", 1],))
    embeds, _ = llm_inputs(model, inputs)
    newline = getattr(model.model, "image_newline", None)
    n_newlines = int((embeds == newline).all(-1).sum()) if newline is not None else 0
    assert (n_newlines > 0) == (family != "qwen2_vl")
    tome_plus.patch(model, "tome", site="features", tokens=4)
    with torch.no_grad():
        model(**inputs)
    report = tome_plus.inspect(model)
    assert report.llm_newlines.tolist() == [n_newlines]
    assert report.llm_kept[0].tolist() == [2 * 4 + n_newlines]


def test_a_prefill_without_padding_runs_sdpa_unmasked_and_matches_the_masked_rows():
    """After the features site, a batch of one (every slot real) gives its SDPA layers no mask (the
    causal kernel, as HF's unpadded prefill); a left-padded batch builds one; the logits agree."""
    model, inputs = model_and_inputs("llava_next", "image")
    tome_plus.patch(model, "tome", site="features", keep=0.3)
    masks = []
    hook = model.model.language_model.layers[1].register_forward_pre_hook(
        lambda m, a, k: masks.append(k.get("attention_mask")), with_kwargs=True)
    with torch.no_grad():
        batch = model(**inputs).logits[:, -1]
        alone = [model(**V.take_row(inputs, row)).logits[0, -1] for row in range(2)]
    hook.remove()
    assert masks[0] is not None and masks[1] is None and masks[2] is None
    torch.testing.assert_close(torch.stack(alone), batch, atol=1e-5, rtol=1e-4)
