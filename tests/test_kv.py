"""kv="a2sf": the KV cache pruned while the language model decodes (A2SF, H2O, a recent window)."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import tome_plus  # noqa: E402
from tome_plus.kv.engine import PrunedLayer, cache_lengths  # noqa: E402

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=200, pad_token_id=0)


def llama(attn="sdpa", cls=LlamaForCausalLM, config=LlamaConfig):
    torch.manual_seed(0)
    return cls._from_config(config(**TEXT), attn_implementation=attn).eval()


def prompts(lengths=(40, 33), seed=1):
    """Left-padded rows of random text."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(3, 200, (length,), generator=g)
        mask[i, n - length:] = 1
    return ids, mask


def greedy(model, ids, mask, new=10, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, **kwargs)


@pytest.mark.parametrize("cls,config", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_budget_of_the_whole_sequence_changes_nothing(cls, config, attn):
    """Budget >= every sequence: greedy tokens, beam search and seeded sampling (several sequences
    per prompt) equal the unpatched model's exactly; unpatch restores."""
    model = llama(attn, cls, config)
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    beams = greedy(model, ids, mask, new=6, num_beams=3)
    torch.manual_seed(5)
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                             num_return_sequences=2)
    for options in ({"budget": 64}, {"budget": 64, "every": 1}, {"budget": 1.0}):
        tome_plus.patch(model, kv="a2sf", kv_options=options)
        assert torch.equal(greedy(model, ids, mask), ref), options
    assert torch.equal(greedy(model, ids, mask, new=6, num_beams=3), beams)
    torch.manual_seed(5)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                      num_return_sequences=2), sampled)
    tome_plus.unpatch(model)
    assert type(model) is cls and torch.equal(greedy(model, ids, mask), ref)


def naive_kept(model, ids, mask, budget, recent, alpha):
    """Per layer, row and KV head: the slots A2SF keeps after the prefill, from the unpatched
    model's own attention probabilities (eager, output_attentions) and the paper's sum, looped."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    kept = []
    groups = TEXT["num_attention_heads"] // TEXT["num_key_value_heads"]
    n = ids.shape[1]
    for probs in out.attentions:  # [B, H, N, N]
        layer = []
        for b in range(ids.shape[0]):
            row = []
            for kv in range(TEXT["num_key_value_heads"]):
                score = torch.zeros(n, dtype=torch.float64)
                for q in range(n):
                    if mask[b, q]:
                        for h in range(kv * groups, (kv + 1) * groups):
                            score += alpha ** (n - 1 - q) * probs[b, h, q].double()
                real = [k for k in range(n) if mask[b, k]]
                newest = list(range(n - recent, n))
                others = sorted((k for k in real if k not in newest), key=lambda k: -score[k])
                chosen = sorted(newest + others[:budget - recent])
                row.append(chosen)
            layer.append(row)
        kept.append(layer)
    return kept, out.past_key_values


@pytest.mark.parametrize("alpha,scoring,blocks", [(0.9, "a2sf", False), (1.0, "h2o", False), (0.9, "a2sf", True)])
def test_prefill_keeps_what_the_paper_keeps(alpha, scoring, blocks, monkeypatch):
    """After the prefill every layer keeps, per row and KV head, the `recent` newest slots and the
    best `budget - recent` others by A = sum_q alpha^(N-1-q) S[q] (S summed over the head's query
    group): the unpatched keys and values at exactly those slots. `blocks`: the scores formed a
    few queries at a time, each block's keys stopping at its last query."""
    if blocks:
        from tome_plus.llm import attention
        monkeypatch.setattr(attention, "BLOCK", 2 * 4 * 40 * 3)  # a few queries per block
    model = llama("eager")
    ids, mask = prompts()
    budget, recent = 12, 3
    want, full = naive_kept(model, ids, mask, budget, recent, alpha)
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": budget, "recent": recent, "forget": alpha,
                                                  "scoring": scoring})
    assert_prefill_keeps(model, ids, mask, budget, want, full)


def test_scores_formed_in_small_blocks_equal_one_blocks(monkeypatch):
    """The engine forms the probabilities a few queries at a time, each block's keys stopping at its
    last query's slot: the scores the pruned layers keep equal those of one block of every query."""
    from tome_plus.llm import attention
    ids, mask = prompts()
    kept = []
    for block in (1 << 30, 2 * 4 * 40 * 3):  # every query at once; 3 queries per block
        monkeypatch.setattr(attention, "BLOCK", block)
        model = llama("eager")
        tome_plus.patch(model, kv="a2sf", kv_options={"budget": 12, "recent": 3, "forget": 0.9})
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, cache=cache)
        kept.append([layer.score for layer in cache.layers])
    for whole, blocks in zip(*kept):
        torch.testing.assert_close(blocks, whole, atol=1e-7, rtol=1e-6)


def test_queries_past_the_horizon_change_no_kept_slot():
    """A2SF forms no probabilities for queries older than its horizon (their weights sum under
    2^-24 of the newest's): on prompts longer than it, each layer keeps exactly the slots of the
    paper's full sum over every query (looped in float64)."""
    from tome_plus.kv.a2sf import horizon
    model = llama("eager")
    ids, mask = prompts(lengths=(260, 231), seed=3)
    assert horizon(0.9) < 231  # both rows have queries past it
    budget, recent = 48, 6
    want, full = naive_kept(model, ids, mask, budget, recent, 0.9)
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": budget, "recent": recent, "forget": 0.9})
    assert_prefill_keeps(model, ids, mask, budget, want, full)


def assert_prefill_keeps(model, ids, mask, budget, want, full):
    """After the patched model's prefill every layer holds, per row and KV head, the unpatched
    keys and values (`full`) at exactly the slots `want` names."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
    assert cache_lengths(cache) == [budget] * TEXT["num_hidden_layers"]
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, PrunedLayer)
        for b in range(ids.shape[0]):
            for kv in range(TEXT["num_key_value_heads"]):
                slots = want[i][b][kv]
                torch.testing.assert_close(layer.keys[b, kv], full.layers[i].keys[b, kv, slots])
                torch.testing.assert_close(layer.values[b, kv], full.layers[i].values[b, kv, slots])
                assert bool(layer.valid[b, kv].all())


def test_the_default_recent_window_shrinks_to_fit_the_budget():
    """`recent` left out is the authors' 16 where the budget holds it, else the whole budget (an
    int budget's at patch, a fraction's for each prompt): the prefill keeps what the paper's rule
    keeps with that window. A `recent` given above a fraction's tokens is refused at the prefill."""
    model = llama("eager")
    ids, mask = prompts()  # 40 slots
    cases = (({"budget": 8}, 8, 8), ({"budget": 24}, 24, 16), ({"budget": 0.1}, 4, 4))
    wants = [naive_kept(model, ids, mask, budget, recent, 0.95) for _, budget, recent in cases]
    for (options, budget, _), (want, full) in zip(cases, wants):
        tome_plus.patch(model, kv="a2sf", kv_options=options)
        assert_prefill_keeps(model, ids, mask, budget, want, full)
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": 0.1, "recent": 16})
    with pytest.raises(ValueError, match="recent=16 is more than budget=0.1 of this 40-token prompt \\(4 tokens\\)"):
        greedy(model, ids, mask)


def test_a_call_without_the_cache_is_refused():
    """Without a cache there is nothing to prune: generate and forward with use_cache=False are
    refused by name instead of quietly running the unpatched model."""
    model = llama()
    ids, mask = prompts()
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": 20, "recent": 4})
    with pytest.raises(ValueError, match="kv='a2sf' prunes the KV cache, but this call has use_cache=False"):
        greedy(model, ids, mask, use_cache=False)
    with pytest.raises(ValueError, match="use_cache=False"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    greedy(model, ids, mask)  # the cached call still runs


def test_a_pruned_cache_attends_to_exactly_what_it_keeps():
    """The recent window keeps the newest `budget` slots in every head: a decode step then gives
    the logits of the unpatched model whose cache holds just those slots (at their own positions)."""
    model = llama()
    ids, mask = prompts(lengths=(40, 40))
    budget = 10
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": budget, "recent": 0, "scoring": "window"})
    cache = DynamicCache(config=model.config)
    step = torch.tensor([[7], [9]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
        got = model(input_ids=step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                    position_ids=torch.full((2, 1), 40), cache=cache).logits
    tome_plus.unpatch(model)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=full)
        for layer in full.layers:
            layer.keys, layer.values = layer.keys[:, :, -budget:], layer.values[:, :, -budget:]
        want = model(input_ids=step, attention_mask=torch.ones(2, budget + 1, dtype=torch.long),
                     position_ids=torch.full((2, 1), 40), cache=full).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_cache_stays_within_the_budget_when_asked():
    """every=1: after every forward no layer holds more than the budget; the authors' default
    prunes the prompt once and appends what is decoded."""
    model = llama()
    ids, mask = prompts()
    budget, new = 16, 12
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": budget, "recent": 4, "every": 1})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache)
        for t in range(new):
            assert max(cache_lengths(cache)) <= budget
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = model(input_ids=token, attention_mask=mask, cache=cache)
    assert max(cache_lengths(cache)) <= budget
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": budget, "recent": 4})
    cache = DynamicCache(config=model.config)
    greedy(model, *prompts(), new=new, cache=cache)
    assert cache_lengths(cache) == [budget + new - 1] * TEXT["num_hidden_layers"]  # the last token is not cached
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": 0.25, "recent": 4})  # a quarter of the prompt
    cache = DynamicCache(config=model.config)
    greedy(model, *prompts(), new=1, cache=cache)
    assert cache_lengths(cache) == [math.ceil(0.25 * 40)] * TEXT["num_hidden_layers"]


@pytest.mark.parametrize("options", [{"budget": 12, "recent": 3}, {"budget": 12, "recent": 3, "every": 2}])
def test_rows_of_a_left_padded_batch_equal_each_row_alone(options):
    model = llama()
    ids, mask = prompts(lengths=(40, 27))
    tome_plus.patch(model, kv="a2sf", kv_options=options)
    batch = greedy(model, ids, mask)
    for row in range(2):
        keep = mask[row].bool()
        alone = greedy(model, ids[row:row + 1, keep], mask[row:row + 1, keep])
        assert torch.equal(batch[row, -10:], alone[0, -10:])


def test_a2sf_runs_with_a_vlm_tower_method():
    """LLaVA-1.5 with tome in the tower and A2SF in its language model: a budget of the whole
    sequence gives the tower-only tokens; a small one bounds every layer."""
    from test_hf import llava, pixels as _pixels, prompts as llava_prompts  # noqa: F401
    model = llava()
    ids, mask = llava_prompts((3, 5), (1, 2))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tome_plus.patch(model, "tome", r=4)
    ref = greedy(model, ids, mask, pixel_values=images)
    tome_plus.patch(model, "tome", r=4, kv="a2sf", kv_options={"budget": 500})
    assert torch.equal(greedy(model, ids, mask, pixel_values=images), ref)
    tome_plus.patch(model, "tome", r=4, kv="a2sf", kv_options={"budget": 20, "every": 1})
    cache = DynamicCache(config=model.config.text_config)
    out = greedy(model, ids, mask, pixel_values=images, cache=cache)
    assert out.shape == ref.shape and max(cache_lengths(cache)) <= 20
    tome_plus.unpatch(model)
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": 20})  # the KV policy alone
    assert greedy(model, ids, mask, pixel_values=images).shape == ref.shape


def test_errors_name_the_fix():
    model = llama()
    with pytest.raises(ValueError, match="unknown KV policy 'h3o'"):
        tome_plus.patch(model, kv="h3o")
    with pytest.raises(TypeError, match="unknown kv_options \\['size'\\]"):
        tome_plus.patch(model, kv="a2sf", kv_options={"size": 3})
    with pytest.raises(ValueError, match="budget must be"):
        tome_plus.patch(model, kv="a2sf", kv_options={"budget": 1.5})
    with pytest.raises(ValueError, match="forget must lie in"):
        tome_plus.patch(model, kv="a2sf", kv_options={"forget": 0.0})
    with pytest.raises(ValueError, match="recent=20 is more than the budget 8"):
        tome_plus.patch(model, kv="a2sf", kv_options={"budget": 8, "recent": 20})
    with pytest.raises(TypeError, match="text-only language model"):
        tome_plus.patch(model, "tome", r=2)
    with pytest.raises(TypeError, match="give a method .* or kv="):
        tome_plus.patch(model)
    with pytest.raises(ValueError, match="sdpa' or 'eager'"):
        tome_plus.patch(llama("flex_attention"), kv="a2sf")
    import timm
    with pytest.raises(TypeError, match="has none"):
        tome_plus.patch(timm.create_model("vit_tiny_patch16_224", depth=1), kv="a2sf")


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl",
                                    "qwen3_vl", "internvl"])
def test_every_vlm_family_takes_the_kv_policy_alone(family):
    """The newer families' language models (Qwen's M-RoPE positions included): a budget of the
    whole sequence gives the unpatched greedy tokens; `every=1` keeps every layer within the budget
    and the cache changes nothing between cached and uncached generation of the first token."""
    import vlm_models as V
    model = V.FACTORIES[family](text_config={"num_hidden_layers": 2})
    model.generation_config.eos_token_id = None
    inputs = V.INPUTS[family](model)
    ref = V.greedy(model, inputs, 6)
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": 1.0, "recent": 2})
    assert torch.equal(V.greedy(model, inputs, 6), ref)
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": 8, "recent": 2, "every": 1})
    cache = DynamicCache(config=model.config)
    out = V.greedy(model, inputs, 6, cache=cache)
    assert out.shape == ref.shape and max(cache_lengths(cache)) <= 8
    assert torch.equal(out[:, :1], ref[:, :1])  # the first token comes from the whole prompt
    tome_plus.unpatch(model)
    assert torch.equal(V.greedy(model, inputs, 6), ref)


@pytest.mark.parametrize("family,method,options", [
    ("llava_next", "tome", dict(site="features", keep=0.5)), ("qwen2_vl", "pitome", dict(site="features", keep=0.6)),
    ("llava_next", "fastv", dict(keep=0.5, k=1)), ("qwen2_5_vl", "atp", dict(keep=0.5, layers=[0, 2])),
    ("qwen3_vl", "tome", dict(site="features", keep=0.5))])
def test_kv_policy_with_the_features_and_llm_sites(family, method, options):
    """A KV policy on a language model whose layers keep a different set of tokens per instance
    (the features site, FastV, ATP): a budget of the whole sequence gives the method's own tokens;
    a small one bounds every layer, and each row of the left-padded batch equals itself alone."""
    import vlm_models as V
    model = V.FACTORIES[family](text_config={"num_hidden_layers": 4})
    model.generation_config.eos_token_id = None
    inputs = V.INPUTS[family](model)
    tome_plus.patch(model, method, **options)
    ref = V.greedy(model, inputs, 6)
    tome_plus.patch(model, method, **options, kv="a2sf", kv_options={"budget": 1.0, "recent": 2})
    assert torch.equal(V.greedy(model, inputs, 6), ref)
    tome_plus.patch(model, method, **options, kv="a2sf", kv_options={"budget": 10, "recent": 2, "every": 1})
    cache = DynamicCache(config=model.config)
    out = V.greedy(model, inputs, 6, cache=cache)
    assert cache_lengths(cache) == [10] * 4 and torch.equal(out[:, :1], ref[:, :1])
    for row in range(2):
        assert torch.equal(V.greedy(model, V.take_row(inputs, row), 6)[0], out[row])
    tome_plus.unpatch(model)
    assert type(model.model.language_model) is type(V.FACTORIES[family]().model.language_model)


def test_a_fractional_budget_is_a_fraction_of_the_prompt_in_every_mode():
    """every=1 with a fraction: the cache settles at that fraction of the prompt, whether or not
    the prefill itself had anything to prune (a review found it grew with the conversation)."""
    model = llama()
    ids, mask = prompts(lengths=(40, 40))
    for fraction, want in ((1.0, 40), (0.5, 20)):
        tome_plus.patch(model, kv="a2sf", kv_options={"budget": fraction, "recent": 2, "every": 1})
        cache = DynamicCache(config=model.config)
        greedy(model, ids, mask, new=15, cache=cache)
        assert cache_lengths(cache) == [want] * TEXT["num_hidden_layers"], fraction


def test_beam_search_reorders_the_scores_with_the_cache():
    """every=1 with a prompt under the budget: the layers keep their scores from the prefill on,
    and a beam reorder moves them with the keys."""
    model = llama()
    ids, mask = prompts(lengths=(20, 20))
    tome_plus.patch(model, kv="a2sf", kv_options={"budget": 64, "recent": 2, "every": 1})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
    layer = cache.layers[0]
    assert isinstance(layer, PrunedLayer)
    keys, score = layer.keys.clone(), layer.score.clone()
    assert not torch.equal(score[0], score[1])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, keys.flip(0)) and torch.equal(layer.score, score.flip(0))


def test_a_later_image_over_a_pruned_cache_is_refused_at_the_llm_site():
    """FastV scores a later turn's image against the cache; once A2SF pruned that cache per head
    the scoring mask no longer fits: refused by name, not computed wrong."""
    import vlm_models as V
    model = V.FACTORIES["llava_next"](text_config={"num_hidden_layers": 4})
    first = V.take_row(V.INPUTS["llava_next"](model), 0)
    second = V.take_row(V.INPUTS["llava_next"](model, seed=2), 1)
    tome_plus.patch(model, "fastv", keep=0.5, k=1, kv="a2sf", kv_options={"budget": 10, "recent": 2})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**first, cache=cache)
        mask = torch.cat([first["attention_mask"], second["attention_mask"]], dim=1)
        with pytest.raises(ValueError, match="fastv scores new visual tokens against a KV cache that kv='a2sf' pruned"):
            model(input_ids=second["input_ids"], pixel_values=second["pixel_values"],
                  image_sizes=second["image_sizes"], attention_mask=mask, cache=cache)


def test_a_policy_is_a_subclass_and_a_registry_line(monkeypatch, request):
    """A policy that only names itself scores with the engine's default hooks, H2O's plain
    accumulation: registered by one line, it keeps what a2sf's `scoring="h2o"` keeps, token for
    token and slot for slot, and `kv_options` are checked against its own fields."""
    import dataclasses
    import sys
    import types

    from tome_plus import kv
    from tome_plus.kv.engine import KvPolicy

    @dataclasses.dataclass
    class Plain(KvPolicy):
        name = "plain"

    module = types.ModuleType("tome_plus.kv.plain")
    module.POLICY = Plain
    monkeypatch.setitem(sys.modules, "tome_plus.kv.plain", module)
    kv.REGISTRY.register("plain", "tome_plus.kv.plain:POLICY", package="transformers")
    request.addfinalizer(lambda: kv.REGISTRY.unregister("plain"))
    assert "plain" in kv.policy_names()
    with pytest.raises(TypeError, match="valid options"):
        kv.make_config("plain", {"forget": 0.5})
    ids, mask = prompts()
    caches = {}
    for name, options in (("plain", {"budget": 20, "every": 3}), ("a2sf", {"budget": 20, "every": 3, "scoring": "h2o"})):
        model = llama()
        tome_plus.patch(model, kv=name, kv_options=options)
        caches[name] = DynamicCache(config=model.config)
        caches[name + " tokens"] = greedy(model, ids, mask, new=8, cache=caches[name])
    assert torch.equal(caches["plain tokens"], caches["a2sf tokens"])
    for mine, theirs in zip(caches["plain"].layers, caches["a2sf"].layers):
        assert isinstance(mine, PrunedLayer) and torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.valid, theirs.valid) and torch.equal(mine.score, theirs.score)
