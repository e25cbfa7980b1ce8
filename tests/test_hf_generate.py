"""All of HF's `generate` on a patched vision-language model, built like HF's own generation tests
(tiny random configs, the unpatched model as the reference): beam search and beam sampling, the
static cache and compiled generation, `output_attentions` and `output_hidden_states` at the
input's positions, packed sequences, what the config reports, and what stays refused.

Two kinds of reference: at a keep-everything budget a patched model must give the unpatched
outputs; with a budget, the same pruned computation reached another way (a static cache against
the dynamic one, a batch against its rows alone, a packed row against the padded batch)."""
import copy

import pytest
import torch

pytest.importorskip("transformers", reason='HF generate tests need transformers: pip install -e ".[hf]"')

from transformers import CompileConfig, DynamicCache, StaticCache  # noqa: E402
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer  # noqa: E402

import tome_plus  # noqa: E402
import vlm_models as V  # noqa: E402
from tome_plus.llm.slots import book_of  # noqa: E402
from test_atp import fa2_standin  # noqa: E402,F401
from test_hf import llava, pixels, prompts  # noqa: E402,F401

BUDGETS = {"fastv": dict(keep=0.5, k=1), "tome": dict(site="features", r=2), "atp": dict(keep=0.5, layers=[0, 2]),
           "pyramiddrop": dict(keep=0.5, layers=[1, 2], positions="kept"),
           "sparsevlm": dict(scale=1.0, layers=[0, 2], positions="kept")}
EVERYTHING = {"fastv": dict(keep=1.0, k=1), "tome": dict(site="features", keep=1.0)}
FAMILIES = ("llava_next", "qwen2_vl")


def tiny(family, attn="sdpa"):
    model = V.FACTORIES[family](text_config={"num_hidden_layers": 4}, attn_implementation=attn)
    model.generation_config.eos_token_id = None  # every run makes the same number of tokens
    return model


def run(model, inputs, seed=0, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, output_scores=True, return_dict_in_generate=True, **kwargs)


def assert_same_generation(got, want, atol=1e-5):
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores)
    for a, b in zip(got.scores, want.scores):  # suppressed tokens are -inf in both
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


MODES = {"beams": dict(num_beams=3, do_sample=False), "beam_sampling": dict(num_beams=2, do_sample=True),
         "beams_returned": dict(num_beams=3, num_return_sequences=2, do_sample=False),
         "static": dict(do_sample=False, cache_implementation="static"),
         "static_beams": dict(num_beams=2, do_sample=False, cache_implementation="static")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", EVERYTHING)
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_generates_as_unpatched(family, method, mode):
    model = tiny(family)
    inputs = V.INPUTS[family](model)
    ref = run(model, inputs, **MODES[mode])
    tome_plus.patch(model, method, **EVERYTHING[method])
    assert_same_generation(run(model, inputs, **MODES[mode]), ref)


@pytest.mark.parametrize("method", BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_prunes_as_the_dynamic_one(family, method):
    """Per-instance kept sets held with masks in the fixed buffer: the same tokens, scores and
    kept counts as the dynamic cache, greedy and with beams."""
    model = tiny(family)
    inputs = V.INPUTS[family](model)
    tome_plus.patch(model, method, **BUDGETS[method])
    for options in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        dynamic = run(model, inputs, **options)
        kept = tome_plus.inspect(model).llm_kept
        assert_same_generation(run(model, inputs, cache_implementation="static", **options), dynamic)
        assert torch.equal(tome_plus.inspect(model).llm_kept, kept)
        visual = (inputs["input_ids"] == V.IMAGE_ID).sum(1).repeat_interleave(kept.shape[1] // 2)  # beams
        assert bool((kept[0] < visual).all())


@pytest.mark.parametrize("method", BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_batch_rows_equal_rows_alone(family, method):
    """Each instance keeps its own tokens, and its beams carry them: the beams of a padded batch
    are those of each prompt alone."""
    model = tiny(family)
    inputs = V.INPUTS[family](model)
    tome_plus.patch(model, method, **BUDGETS[method])
    for options in (dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)):
        batch = V.greedy(model, inputs, 4, **options)
        alone = torch.cat([V.greedy(model, V.take_row(inputs, i), 4, **options) for i in range(2)])
        assert torch.equal(batch, alone)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cache_reorder_moves_each_rows_kept_set(kind):
    """`generate`'s beam reorder (`Cache.reorder_cache`) moves the book of kept slots with the
    layers: swapping the rows of the cache and of the next tokens swaps the logits."""
    model = tiny("llava_next")
    inputs = V.INPUTS["llava_next"](model)
    tome_plus.patch(model, "fastv", keep=0.25, k=1)
    cache = (DynamicCache(config=model.config.text_config) if kind == "dynamic" else
             StaticCache(config=model.config.text_config, max_cache_len=inputs["input_ids"].shape[1] + 4))
    with torch.no_grad():
        first = model(**inputs, cache=cache, use_cache=True)
    kept = tome_plus.inspect(model).llm_kept[0]
    assert kept[0] != kept[1]  # the rows keep different numbers of slots
    swapped = copy.deepcopy(cache)
    swapped.reorder_cache(torch.tensor([1, 0]))
    token = first.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        step = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits
        back = model(input_ids=token.flip(0), attention_mask=mask.flip(0), cache=swapped, use_cache=True).logits
    torch.testing.assert_close(back.flip(0), step, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", BUDGETS)
def test_assisted_decoding_equals_greedy(method):
    """Assisted and prompt-lookup decoding crop the rejected candidates off the cache (the last
    decoded tokens, one slot per row in every segment): the tokens are greedy's, and the cache
    stays the class `generate` made."""
    model = tiny("llava_next")
    inputs = V.take_row(V.INPUTS["llava_next"](model), 0)  # HF assists a batch of one
    tome_plus.patch(model, method, **BUDGETS[method])
    greedy = run(model, inputs, do_sample=False)
    got = run(model, inputs, do_sample=False, prompt_lookup_num_tokens=2)
    assert torch.equal(got.sequences, greedy.sequences)
    # what an assistant's rejected candidates do: decode two tokens, crop the last, decode it again
    inputs = V.INPUTS["llava_next"](model)
    cache = DynamicCache(config=model.config.text_config)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        token = model(**inputs, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            steps.append(model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits)
            token = steps[-1][:, -1:].argmax(-1)
        assert type(cache) is DynamicCache
        cache.crop(-1)
        again = model(input_ids=steps[0][:, -1:].argmax(-1), attention_mask=mask, cache=cache, use_cache=True).logits
    torch.testing.assert_close(again, steps[1], rtol=1e-5, atol=1e-5)


def test_compiled_generate_equals_the_static_cache():
    """HF's compiled decoding (`compile_config`; on a CPU it asks for `_compile_all_devices`) runs
    the static-cache steps through torch.compile and gives the uncompiled tokens."""
    model = tiny("llava_next")
    inputs = V.INPUTS["llava_next"](model)
    tome_plus.patch(model, "fastv", keep=0.5, k=1)
    ref = run(model, inputs, do_sample=False, cache_implementation="static")
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True
    torch._dynamo.reset()
    try:
        got = run(model, inputs, do_sample=False, cache_implementation="static", compile_config=config)
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled > 0
    assert_same_generation(got, ref)


# ------------------------------------------------------------------ attentions and hidden states

def attentions(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, output_attentions=True, **kwargs).attentions


@pytest.mark.parametrize("method", list(EVERYTHING) + ["atp"])
def test_attentions_keeping_everything_are_unpatched(method):
    model = tiny("llava_next", attn="eager")
    inputs = V.INPUTS["llava_next"](model)
    real = inputs["attention_mask"][:, None, :, None]  # HF's padding rows are a uniform junk row; ours zeros
    ref = attentions(model, inputs)
    tome_plus.patch(model, method, **(EVERYTHING.get(method) or dict(keep=1.0, layers=[0, 2])))
    got = attentions(model, inputs)
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b * real, rtol=1e-5, atol=1e-6)
    gen = run(model, inputs, do_sample=False, output_attentions=True)
    tome_plus.unpatch(model)
    want = run(model, inputs, do_sample=False, output_attentions=True)
    assert len(gen.attentions) == len(want.attentions) == 4
    for i, (step, ref_step) in enumerate(zip(gen.attentions, want.attentions)):
        for a, b in zip(step, ref_step):
            torch.testing.assert_close(a, b * real if i == 0 else b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", BUDGETS)
def test_attentions_with_a_budget_sit_at_the_inputs_positions(method):
    """Each layer's probabilities `[B, H, L, L]` at the input's positions: before the first site
    as unpatched; after it a pruned token's row and column are zeros, a kept token's row sums to
    1, causal. With SDPA (no probabilities of its own) the attentions are empty, as unpatched."""
    model = tiny("llava_next", attn="eager")
    inputs = V.INPUTS["llava_next"](model)
    ref = [a * inputs["attention_mask"][:, None, :, None] for a in attentions(model, inputs)]
    tome_plus.patch(model, method, **BUDGETS[method])
    got = attentions(model, inputs)
    info = tome_plus.inspect(model)
    n = inputs["input_ids"].shape[1]
    mask = inputs["attention_mask"].bool()
    assert [tuple(a.shape) for a in got] == [tuple(a.shape) for a in ref]
    first = 0 if method == "tome" else 1  # the features site is before layer 0; the others prune after layer 0
    for a, b in zip(got[:first], ref[:first]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    alive = torch.zeros(2, n, dtype=torch.bool)
    positions = info.llm_positions[0]  # the input positions each row keeps after the first site
    for row in range(2):
        alive[row, positions[row][positions[row] >= 0]] = True
    if method != "tome":
        alive &= mask  # a kept slot is a real token
    later = got[first]
    assert bool((later.sum(-1).transpose(1, 2)[alive] - 1).abs().max() < 1e-4)  # kept rows: a distribution
    assert bool((later.transpose(1, 2)[~alive] == 0).all())  # pruned and padding rows
    assert bool((later.permute(0, 3, 1, 2)[~alive] == 0).all())  # pruned and padding columns
    if method != "sparsevlm":  # a merged token sits at its cluster centre's input position, after the kept visual ones
        assert bool((later.triu(1) == 0).all())  # causal
    sdpa = tiny("llava_next")
    unpatched = attentions(sdpa, inputs)
    tome_plus.patch(sdpa, method, **BUDGETS[method])
    assert attentions(sdpa, inputs) == unpatched == ()


@pytest.mark.parametrize("method", BUDGETS)
def test_hidden_states_as_a_list_of_layers(method):
    """`output_hidden_states=[...]` (HF's layer selection, negative indices from the end): the
    chosen states equal those of `output_hidden_states=True`, None elsewhere, as unpatched."""
    model = tiny("qwen2_vl")
    inputs = V.INPUTS["qwen2_vl"](model)
    chosen = [0, 2, -1]
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=chosen).hidden_states
    tome_plus.patch(model, method, **BUDGETS[method])
    with torch.no_grad():
        every = model(**inputs, output_hidden_states=True).hidden_states
        got = model(**inputs, output_hidden_states=chosen).hidden_states
    assert len(got) == len(ref) == len(every) == 5
    assert [s is None for s in got] == [s is None for s in ref]
    for i in (0, 2, 4):
        torch.testing.assert_close(got[i], every[i], rtol=0, atol=0)


# ------------------------------------------------------------------------------ packed sequences

def llava_packed(pixels):
    """Two LLaVA prompts: as a left-padded batch, and packed into one row (position ids
    restarting, no mask), with the real positions of each row in the packed one."""
    ids, mask = prompts((3, 5), (1, 2))
    rows = [ids[i][mask[i].bool()] for i in range(2)]
    packed = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), dict(
        input_ids=packed, position_ids=positions, pixel_values=pixels), rows


@pytest.mark.parametrize("method,options", [("fastv", dict(keep=0.5)), ("tome", dict(site="features", r=4)),
                                            ("atp", dict(keep=0.5, layers=[0, 2])), (None, {})])
def test_packed_prompts_equal_the_padded_batch(method, options, pixels):
    model = llava()
    if method is not None:
        tome_plus.patch(model, method, **options)
    padded, packed, rows = llava_packed(pixels)
    with torch.no_grad():
        ref = model(**padded, use_cache=False).logits
        kept = tome_plus.inspect(model).llm_kept if method else None
        got = model(**packed, use_cache=False).logits
    start = 0
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[0, start:start + len(row)], ref[i, -len(row):], rtol=1e-4, atol=1e-5)
        start += len(row)
    if method:
        assert torch.equal(tome_plus.inspect(model).llm_kept, kept)


def test_qwen_packed_position_ids_equal_the_padded_batch():
    """Qwen2-VL packed as HF's padding-free training feeds it: `[4, 1, L]` position ids (text
    positions restarting per prompt, then the M-RoPE rows of each prompt alone)."""
    model = tiny("qwen2_vl")
    inputs = V.INPUTS["qwen2_vl"](model)
    tome_plus.patch(model, "fastv", keep=0.5, k=1)
    alone = [V.take_row(inputs, i) for i in range(2)]
    position_rows = []
    for row in alone:
        rope, _ = model.model.get_rope_index(row["input_ids"], row["mm_token_type_ids"], row["image_grid_thw"],
                                             attention_mask=row["attention_mask"])
        text = torch.arange(row["input_ids"].shape[1])[None, None]
        position_rows.append(torch.cat([text, rope], dim=0))
    packed = dict(input_ids=torch.cat([r["input_ids"] for r in alone], 1),
                  mm_token_type_ids=torch.cat([r["mm_token_type_ids"] for r in alone], 1),
                  position_ids=torch.cat(position_rows, dim=2), pixel_values=inputs["pixel_values"],
                  image_grid_thw=inputs["image_grid_thw"])
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
        got = model(**packed, use_cache=False).logits
    start = 0
    for i, row in enumerate(alone):
        length = row["input_ids"].shape[1]
        torch.testing.assert_close(got[0, start:start + length], ref[i, -length:], rtol=1e-4, atol=1e-5)
        start += length


# --------------------------------------------------------------------------- config and refusals

@pytest.mark.parametrize("method", BUDGETS)
def test_config_reports_the_users_backend(method):
    model = tiny("llava_next", attn="eager")
    tome_plus.patch(model, method, **BUDGETS[method])
    language = model.model.language_model
    with torch.no_grad():
        model(**V.INPUTS["llava_next"](model))
    assert model.config._attn_implementation == language.config._attn_implementation == "eager"
    assert language.layers[0].self_attn.config._attn_implementation == "eager"
    assert language.layers[0].self_attn.config is language.config


def test_what_stays_refused_is_named(fa2_standin):
    model = tiny("llava_next")
    inputs = V.INPUTS["llava_next"](model)
    tome_plus.patch(model, "fastv", keep=0.5, k=1)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
    column = book_of(cache).column[-1]  # after the site: each row's kept tokens' columns
    k = next(k for k in range(1, column.shape[1]) if not bool((column[:, -k:] == column[:1, -k:]).all()))
    with pytest.raises(ValueError, match="cropping this cache would cut into a forward that pruned"):
        cache.crop(-k)  # into the prompt, where the rows kept different tokens
    window = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=8) for _ in range(4)])
    with pytest.raises(ValueError, match="'fastv' at site='llm' keeps a different number of tokens per instance.*"
                                         "DynamicSlidingWindowLayer layers"), torch.no_grad():
        model(**inputs, cache=window, use_cache=True)
    configured = tiny("llava_next")
    configured.generation_config.cache_implementation = "static"
    tome_plus.patch(configured, "fastv", keep=0.5, k=1)  # a cache it holds
    configured.generation_config.cache_implementation = "sliding_window"
    with pytest.raises(ValueError, match="cache_implementation='sliding_window'; 'fastv' at site='llm' keeps"):
        tome_plus.patch(configured, "fastv", keep=0.5, k=1)
    with pytest.raises(ValueError, match="4-D attention mask"), torch.no_grad():
        model(**dict(inputs, attention_mask=inputs["attention_mask"][:, None, None, :].bool()))
    flash = tiny("llava_next")
    flash.set_attn_implementation(fa2_standin)
    tome_plus.patch(flash, "fastv", keep=0.5, k=1)
    with pytest.raises(ValueError, match=f"static cache masks each row's slots.*{fa2_standin} backend"):
        run(flash, inputs, do_sample=False, cache_implementation="static")


@pytest.mark.parametrize("method", BUDGETS)
def test_a_generated_placeholder_id_is_a_plain_token(method):
    """A decoding step that generates the image placeholder's id carries no image (HF passes the
    media to the prefill only): nothing is reduced there, every layer caches the token, and
    `inspect` still reports the prompt's reduction."""
    model = tiny("llava_next")
    inputs = V.INPUTS["llava_next"](model)
    tome_plus.patch(model, method, **BUDGETS[method])
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
    kept, widths = tome_plus.inspect(model).llm_kept, [v.shape[1] for v in book_of(cache).valid]
    token = torch.full((2, 1), V.IMAGE_ID)  # as if generated
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    with torch.no_grad():
        model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
    assert torch.equal(tome_plus.inspect(model).llm_kept, kept)
    book = book_of(cache)
    assert [v.shape[1] for v in book.valid] == [w + 1 for w in widths]
    assert all(bool(v[:, -1].all()) for v in book.valid)  # the new token is a real slot in every segment
