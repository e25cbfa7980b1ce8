"""PyramidDrop (`methods/pyramiddrop.py`): the patched LLaVA equals a restatement of the authors'
inference loop (Cooperx521/PyramidDrop, `LlamaModel.pdrop_forward` / `pdrop_rank_drop`: rank with the
next layer's norm, q, k and rotary from the last prompt token, `int(n ratio)` of the original count,
survivors renumbered), greedy decoding included; the stage counts; positions="kept"; refusals."""
import math

import pytest
import torch

pytest.importorskip("transformers")

import tome_plus  # noqa: E402
from tome_plus.methods.pyramiddrop import PyramidDrop, PyramidDropConfig  # noqa: E402
from test_atp import fa2_standin  # noqa: E402,F401
from test_hf import (IMAGE_ID, N_IMAGE, assert_rows_alone, llava, llava_embeddings, pixels,  # noqa: E402,F401
                     prompts)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def authors_logits(model, ids, px, layers, ratios, prompt_len):
    """One unpadded row, no cache, as their loop runs: after layer L (1-based) in `layers`, layer L's
    input norm, q and k (rotary at the current positions) give the last prompt token's softmax over
    every token; averaged over heads, the image columns ranked; `int(n ratio)` stay in order; the
    positions restart at 0..len-1. Returns the last token's logits."""
    lm = model.model.language_model
    with torch.no_grad():
        h = llava_embeddings(model, ids, px)
        image_index = int((ids[0] == IMAGE_ID).nonzero()[0])
        current = N_IMAGE
        query = prompt_len - 1
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        for idx, layer in enumerate(lm.layers):
            cos, sin = lm.rotary_emb(h, positions)
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
            if idx + 1 not in layers:
                continue
            stage = layers.index(idx + 1)
            nxt = lm.layers[idx + 1].self_attn
            x = lm.layers[idx + 1].input_layernorm(h)
            q = nxt.q_proj(x).view(1, x.shape[1], -1, nxt.head_dim).transpose(1, 2)
            k = nxt.k_proj(x).view(1, x.shape[1], -1, nxt.head_dim).transpose(1, 2)
            q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
            k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            w = (q[:, :, query:query + 1] @ k.transpose(2, 3)) / math.sqrt(nxt.head_dim)
            w = w.masked_fill(torch.arange(x.shape[1]) > query, float("-inf")).softmax(dim=-1, dtype=torch.float32)
            avg = w.mean(dim=1)[0, 0, image_index:image_index + current]
            keep_len = int(N_IMAGE * ratios[stage])
            top = avg.topk(keep_len).indices.sort().values + image_index
            h = torch.cat([h[:, :image_index], h[:, top], h[:, image_index + current:]], dim=1)
            query -= current - keep_len
            current = keep_len
            positions = torch.arange(h.shape[1]).unsqueeze(0)
        return model.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("layers,keep,ratios", [([1, 2, 3], 0.5, [0.5, 0.25, 0.125]),
                                                ([2], [0.3], [0.3]),
                                                ([1, 3], [0.6, 0.2], [0.6, 0.2])])
def test_prefill_and_greedy_decoding_equal_the_authors(layers, keep, ratios, pixels):
    model = llava()
    ids, _ = prompts((3, 5))
    px = pixels[:1]
    want = [authors_logits(model, ids, px, layers, ratios, ids.shape[1])]
    steps = [ids]
    for _ in range(3):  # their decoding without a cache: the whole row again, ranked by the last prompt token
        steps.append(torch.cat([steps[-1], want[-1].argmax(dim=-1, keepdim=True)], dim=1))
        want.append(authors_logits(model, steps[-1], px, layers, ratios, ids.shape[1]))
    tome_plus.patch(model, "pyramiddrop", layers=layers, keep=keep)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits[:, -1]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px, max_new_tokens=4,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[0, ids.shape[1]:], torch.stack([w.argmax(dim=-1)[0] for w in want]))
    for score, w in zip(out.scores, want):  # decoding with the cache: positions moved back per stage
        torch.testing.assert_close(score, w, rtol=1e-4, atol=1e-4)
    kept = tome_plus.inspect(model).llm_kept[:, 0].tolist()
    assert kept == [int(N_IMAGE * r) for r in ratios]


def test_stage_counts():
    reducer = PyramidDrop(PyramidDropConfig())
    assert reducer.sites(32) == [7, 15, 23]  # after layers 8, 16, 24 (the paper's quarters)
    n, images = torch.tensor([576, 100]), torch.tensor([1, 1])
    assert [reducer.stage_count(s, 3, n, images).tolist() for s in (1, 2, 3)] == [[288, 50], [144, 25], [72, 12]]
    tokens = PyramidDrop(PyramidDropConfig(tokens=64))
    tokens.sites(32)
    counts = [tokens.stage_count(s, 3, torch.tensor([576]), torch.tensor([1])).item() for s in (1, 2, 3)]
    assert counts == [int(576 * (64 / 576) ** (1 / 3) + 1e-9), int(576 * (64 / 576) ** (2 / 3) + 1e-9), 64]


def test_positions_kept_and_batches(pixels):
    """positions="kept": every survivor keeps its position; a left-padded batch equals its rows alone;
    keep=1.0 gives the unpatched tokens; the cache changes nothing."""
    model = llava()
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                             do_sample=False)
    tome_plus.patch(model, "pyramiddrop", keep=1.0)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                          do_sample=False), ref)
    for positions in ("kept", "packed"):
        tome_plus.patch(model, "pyramiddrop", layers=[1, 2], keep=0.5, positions=positions)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                 do_sample=False)
            assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                                   max_new_tokens=4, do_sample=False, use_cache=False))
        kept_positions = tome_plus.inspect(model).llm_positions[-1]
        real = kept_positions[kept_positions >= 0]
        if positions == "kept":  # gaps where the dropped tokens were
            assert int(real.max()) > real.numel()
        assert_rows_alone(model, out, ids, [(3, 5), (1, 2)], pixels, 4)


def test_refusals():
    model = llava()
    with pytest.raises(ValueError, match="budget as keep"):
        tome_plus.patch(model, "pyramiddrop", r=4)
    with pytest.raises(ValueError, match="layers must be increasing ints >= 1"):
        tome_plus.patch(model, "pyramiddrop", layers=[2, 1])
    with pytest.raises(ValueError, match="drops after one of the first 3 decoder layers of 4"):
        tome_plus.patch(model, "pyramiddrop", layers=[1, 4])
    with pytest.raises(ValueError, match="keep gives 2 stage fractions for 3 layers"):
        tome_plus.patch(model, "pyramiddrop", layers=[1, 2, 3], keep=[0.5, 0.2])
    with pytest.raises(ValueError, match="not increasing"):
        tome_plus.patch(model, "pyramiddrop", layers=[1, 2], keep=[0.2, 0.5])


def test_packed_positions_are_refused_on_m_rope():
    import vlm_models as V
    model = V.FACTORIES["qwen2_vl"](text_config={"num_hidden_layers": 4})
    with pytest.raises(ValueError, match="M-RoPE positions .* are not packed yet: use positions='kept'"):
        tome_plus.patch(model, "pyramiddrop", layers=[1, 2])
    tome_plus.patch(model, "pyramiddrop", layers=[1, 2], positions="kept")


@pytest.mark.parametrize("impl", ["eager", "flex_attention", "fa2"])
def test_every_attention_backend_and_the_static_cache_drop_alike(impl, fa2_standin, pixels):
    """Packed positions through every backend, beams and a static cache: the same tokens as sdpa's
    dynamic cache (each site's shift carried in the cache's book, reordered with the beams)."""
    ids, mask = prompts((3, 5), (1, 2))
    run = lambda m, **kw: m.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                     do_sample=False, **kw)
    ref_model = llava()
    tome_plus.patch(ref_model, "pyramiddrop", layers=[1, 2], keep=0.5)
    model = llava()
    model.set_attn_implementation(fa2_standin if impl == "fa2" else impl)
    tome_plus.patch(model, "pyramiddrop", layers=[1, 2], keep=0.5)
    with torch.no_grad():
        ref = run(ref_model)
        assert torch.equal(run(model), ref)
        if impl == "eager":
            assert torch.equal(run(model, cache_implementation="static"), ref)
            assert torch.equal(run(model, num_beams=2, cache_implementation="static"), run(ref_model, num_beams=2))
