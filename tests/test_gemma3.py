"""Gemma 3 in the decoder loop: an image's tokens attend each other both ways (blocks from
`token_type_ids`), sliding-window layers and global ones with their own rotary bases, q/k-norm;
the features site keeps a reduced image's tokens attending both ways."""
import pytest
import torch

pytest.importorskip("transformers")

import tome_plus  # noqa: E402
import vlm_models as V  # noqa: E402
from test_vlm_features import naive_features  # noqa: E402
from tome_plus.llm.segments import Segment, segment_mask  # noqa: E402
from tome_plus.llm.slots import SegmentKeys  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

ROWS = ([3, "image", 5, "image", 2], [1, "image", 2])  # three images, one with pan-and-scan crops


def model_and_inputs(window=8, layers=4):
    model = V.gemma3(text_config={"num_hidden_layers": layers, "sliding_window": window})
    model.generation_config.eos_token_id = None
    return model, V.gemma3_inputs(model, rows=ROWS, image_sizes=((32, 32),) * 3, crops=[0, 2, 0])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method,options", [("tome", {"site": "features", "keep": 1.0}),
                                            ("fastv", {"keep": 1.0, "k": 2})])
def test_keeping_everything_gives_the_unpatched_logits_everywhere(method, options):
    """A window (8) shorter than an image block (16 tokens) and than the prompts, blocks attending
    forward past it, a left-padded batch: every real position's logits are the unpatched ones."""
    model, inputs = model_and_inputs()
    ref = logits(model, inputs)
    tome_plus.patch(model, method, **options)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits(model, inputs)[real], ref[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("both_ways", [True, False])
def test_features_site_keeps_a_reduced_image_attending_both_ways(both_ways):
    """One row, a window longer than the prompt (the loop bounds the look-back in the
    conversation's columns; HF's run on fewer tokens, in its own): tome at the features site equals HF's Gemma 3 run
    on the embeddings a plain loop merges, each image's kept tokens one block attending both ways
    (`token_type_ids` of the kept tokens). Without `token_type_ids` the call is causal
    everywhere, as HF's is."""
    model, inputs = model_and_inputs(window=128)
    row = V.take_row(inputs, 0)
    if not both_ways:
        row.pop("token_type_ids")
    got = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**row)
    hook.remove()
    ids = row["input_ids"][0]
    x, kept = naive_features(got["inputs_embeds"][0], ids, None, n_keep=5)
    kept_ids = ids[kept][None]
    reference = dict(inputs_embeds=x[None], attention_mask=torch.ones_like(kept_ids), position_ids=kept[None])
    if both_ways:
        reference["token_type_ids"] = (kept_ids == V.IMAGE_ID).long()
    with torch.no_grad():
        want = model.lm_head(model.model(**reference).last_hidden_state[:, -1])
        causal = model.lm_head(model.model(**{k: v for k, v in reference.items() if k != "token_type_ids"}
                                           ).last_hidden_state[:, -1])
    if both_ways:
        assert not torch.allclose(want, causal, atol=1e-3)  # the blocks matter here
    tome_plus.patch(model, "tome", site="features", tokens=5)
    torch.testing.assert_close(logits(model, row)[:, -1], want, atol=1e-4, rtol=1e-4)
    assert tome_plus.inspect(model).llm_kept[0].tolist() == [4 * 5]  # an image, another and its two crops


def test_the_masks_follow_the_rule_after_a_site():
    """`segment_mask` with image blocks and a window, on slots a site kept (gaps in the columns):
    each entry equals the rule written per pair (a real key at or before the query, or in its
    block; no key `window` or more columns back; each slot sees itself)."""
    torch.manual_seed(0)
    batch, past, k, window = 2, 3, 7, 4
    valid = torch.rand(batch, k) > 0.2
    groups = torch.where(torch.rand(batch, k) > 0.5, torch.randint(0, 2, (batch, k)), -1)
    groups = torch.where(valid, groups, -1)
    index = torch.sort(torch.randperm(12)[:k]).values.expand(batch, k)  # kept input positions, with gaps
    prior = torch.rand(batch, past) > 0.3
    column = torch.cat([torch.where(prior, torch.arange(past), -1), torch.where(valid, index + past, -1)], dim=1)
    keys = SegmentKeys(torch.cat([prior, valid], dim=1), past, column)
    seg = Segment(index=index, valid=valid, positions=index, cos=None, sin=None, visual=valid, spatial=None,
                  instruction=valid, prompt=valid, groups=groups)
    mask = segment_mask(keys, seg, torch.float32, window)[:, 0]
    for b in range(batch):
        for q in range(k):
            for j in range(past + k):
                in_block = j >= past and groups[b, q] >= 0 and groups[b, q] == groups[b, j - past]
                seen = bool(keys.valid[b, j]) and (j <= past + q or in_block)
                near = int(column[b, past + q]) - int(column[b, j]) < window
                want = (seen and near) or j == past + q
                assert bool(mask[b, q, j]) == want, (b, q, j)


def test_fastv_scores_an_image_block_with_its_later_keys_in_small_blocks(monkeypatch):
    """The scoring layer's blocks of queries stop their keys at the block's last slot only under a
    causal mask: an image token here sees its block's later tokens, so blocks of 2 queries give
    the attention received of one block."""
    from tome_plus.llm import attention
    received, whole = [], attention.received_attention
    monkeypatch.setattr(attention, "received_attention", lambda *a, **k: received.append(whole(*a, **k)) or received[-1])
    for block in (1 << 30, 2 * 4 * 64 * 2):
        monkeypatch.setattr(attention, "BLOCK", block)
        model, inputs = model_and_inputs()
        tome_plus.patch(model, "fastv", keep=0.5, k=2)
        logits(model, inputs)
    assert len(received) == 2
    torch.testing.assert_close(received[1], received[0], atol=1e-6, rtol=1e-5)


def test_sliding_layers_cache_every_slot_and_decode_as_without_a_cache():
    model, inputs = model_and_inputs()
    tome_plus.patch(model, "fastv", keep=0.5, k=2)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in out.cache.layers)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(V.greedy(model, inputs, 4, use_cache=False), new)


def test_backends_and_caches_that_cannot_hold_it_are_refused_by_name():
    model, _ = model_and_inputs()
    model.generation_config.cache_implementation = "static"
    with pytest.raises(ValueError, match="static cache.s sliding or linear-attention layers"):
        tome_plus.patch(model, "fastv", keep=0.5)
    model.generation_config.cache_implementation = "hybrid"  # HF's generate unsets it: the dynamic cache
    tome_plus.patch(model, "fastv", keep=0.5)
    tome_plus.unpatch(model)
    model.generation_config.cache_implementation = None
    with pytest.raises(TypeError, match="KV engine's per-head masks"):
        tome_plus.patch(model, kv="a2sf", kv_options={"budget": 8})
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="both ways within an image"):
        tome_plus.patch(model, "tome", site="features", keep=0.5)
