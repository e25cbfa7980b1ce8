"""SparseVLM (`methods/sparsevlm.py`): the patched LLaVA's prefill equals a restatement of the
authors' inference loop (Theia-4869/SparseVLM, `LlamaModel.forward` with `attn_postprocess_rank` and
`cluster_and_merge`: raters from the input embeddings, the rank-adaptive count, recycling into
density-peak clusters placed after the kept visual tokens, positions renumbered); their clustering
and rater rule on random inputs; cache, batches and refusals."""
import math

import pytest
import torch

pytest.importorskip("transformers")

import tome_plus  # noqa: E402
from tome_plus.methods.sparsevlm import SparseVlmConfig, cluster_and_merge, raters  # noqa: E402
from test_hf import (IMAGE_ID, N_IMAGE, assert_rows_alone, llava, llava_embeddings, pixels,  # noqa: E402,F401
                     prompts)


def authors_cluster_and_merge(x, cluster_num):
    """Their `cluster_and_merge` step by step (batch 1), the random tie-break of equal densities
    (their 1e-6 noise) by the index, as the library documents; score ties by the index too."""
    b, n, c = x.shape
    dist = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    later = torch.arange(n)[None, :] < torch.arange(n)[:, None]
    mask = ((density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None]) & later))
    mask = mask.type(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    d, _ = (dist * mask + dist_max * (1 - mask)).min(dim=-1)
    index_down = (d * density).argsort(dim=-1, descending=True, stable=True)[:, :cluster_num]
    idx_cluster = dist[0][index_down[0]][None].argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster.reshape(n), torch.ones(n, 1)) + 1e-6
    norm_weight = torch.ones(n, 1) / all_weight[idx_cluster.reshape(n)]
    return torch.zeros(cluster_num, c).index_add_(0, idx_cluster.reshape(n), x[0] * norm_weight)[None]


def layer_probs(layer, h, cos, sin):
    """A decoder layer's causal attention probabilities, head-averaged (their eager softmax)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n = x.shape[1]
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    half = q.shape[-1] // 2
    turn = lambda t: torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    q, k = q * cos[:, None] + turn(q) * sin[:, None], k * cos[:, None] + turn(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    w = (q @ k.transpose(2, 3)) / math.sqrt(attn.head_dim)
    w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return w.softmax(dim=-1, dtype=torch.float32).mean(dim=1)[0]


def authors_logits(model, ids, px, layers, scale, shift):
    """One unpadded row, their prefill: returns the last token's logits and the visual counts."""
    lm = model.model.language_model
    with torch.no_grad():
        h = llava_embeddings(model, ids, px)
        v_start = int((ids[0] == IMAGE_ID).nonzero()[0])
        v_num, t_start = N_IMAGE, v_start + N_IMAGE
        m = (h[:, v_start:t_start] @ h[:, t_start:].transpose(1, 2)).softmax(2).mean(1)
        t_idx = torch.where(m > m.mean())[1]
        positions = torch.arange(h.shape[1])[None]
        counts = []
        for idx, layer in enumerate(lm.layers):
            cos, sin = lm.rotary_emb(h, positions)
            probs = layer_probs(layer, h, cos, sin) if idx in layers else None
            out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
            out = out[0] if isinstance(out, tuple) else out
            if idx in layers:
                relation = probs[t_idx + t_start][:, v_start:v_start + v_num]
                rank = int(torch.linalg.matrix_rank(relation.float()))
                relation = relation.mean(0)
                n_keep = int(rank * scale + shift)
                if v_num - rank != 0 and n_keep < v_num:
                    mask = torch.zeros(v_num, dtype=torch.bool)
                    mask[torch.topk(relation, n_keep).indices] = True
                    policy = torch.ones(out.shape[1], dtype=torch.bool)
                    policy[v_start:t_start] = mask
                    sparse = out[:, ~policy]
                    stage1 = torch.where(~mask)[0]
                    n_recycled = int(stage1.shape[0] * 0.3) + 1
                    stage2 = relation[stage1].topk(n_recycled)[1]
                    cluster_num = int(n_recycled * 0.1) + 1
                    merged = authors_cluster_and_merge(sparse[:, stage2], cluster_num)
                    select = out[:, policy]
                    out = torch.cat([select[:, :v_start + n_keep], merged, select[:, v_start + n_keep:]], dim=1)
                    positions = torch.arange(out.shape[1])[None]
                    v_num = n_keep + cluster_num
                    t_start = v_start + v_num
                counts.append(v_num)
            h = out
        return model.lm_head(lm.norm(h))[:, -1], counts


@pytest.mark.parametrize("layers,scale,shift", [([0, 1, 2], 1.0, 0.0), ([1], 2.0, 3.0), ([0, 2], 0.8, 0.0)])
def test_prefill_equals_the_authors(layers, scale, shift, pixels):
    model = llava()
    ids, _ = prompts((3, 9))
    want, counts = authors_logits(model, ids, pixels[:1], layers, scale, shift)
    assert counts[-1] < N_IMAGE  # the case prunes and recycles
    tome_plus.patch(model, "sparsevlm", layers=layers, scale=scale, shift=shift)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels[:1]).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert tome_plus.inspect(model).llm_kept[:, 0].tolist() == counts


def test_clustering_and_raters_are_the_authors():
    torch.manual_seed(0)
    for m, k in ((20, 3), (7, 1), (40, 5)):
        x = torch.randn(m, 6)
        merged, centres = cluster_and_merge(x, k)
        torch.testing.assert_close(merged, authors_cluster_and_merge(x[None], k)[0])
        assert len(set(centres.tolist())) == k
    e = torch.randn(1, 12, 8)
    visual = torch.zeros(1, 12, dtype=torch.bool)
    visual[0, 2:7] = True
    text = torch.zeros_like(visual)
    text[0, 7:] = True
    m = (e[:, 2:7] @ e[:, 7:].transpose(1, 2)).softmax(2).mean(1)
    want = torch.zeros_like(visual)
    want[0, 7:] = m[0] > m.mean()
    assert torch.equal(raters(e, visual, text), want)


def test_cache_batches_and_keep_everything(pixels):
    """Generation with the cache equals it without (positions renumbered per site, merged tokens
    included); a left-padded batch equals its rows alone; a scale that keeps every token changes
    nothing; unpatch restores."""
    model = llava()
    ids, mask = prompts((3, 5), (1, 2))
    run = lambda **kw: model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                      do_sample=False, **kw)
    with torch.no_grad():
        ref = run()
    tome_plus.patch(model, "sparsevlm", layers=[0, 2], scale=1000.0)
    with torch.no_grad():
        assert torch.equal(run(), ref)
    for positions in ("packed", "kept"):
        tome_plus.patch(model, "sparsevlm", layers=[0, 1, 2], scale=1.0, positions=positions)
        with torch.no_grad():
            out = run()
            assert torch.equal(run(use_cache=False), out)
        assert bool((tome_plus.inspect(model).llm_kept[0] < N_IMAGE).all())
        assert_rows_alone(model, out, ids, [(3, 5), (1, 2)], pixels, 4)
    tome_plus.unpatch(model)
    with torch.no_grad():
        assert torch.equal(run(), ref)


def test_budgets_and_refusals():
    assert (SparseVlmConfig(tokens=128).scale, SparseVlmConfig(tokens=128).shift) == (9.0, 6.0)
    assert SparseVlmConfig().scale == 13.5
    model = llava()
    with pytest.raises(ValueError, match="adaptive count"):
        tome_plus.patch(model, "sparsevlm", keep=0.5)
    with pytest.raises(ValueError, match="192, 128 and 64 tokens only"):
        tome_plus.patch(model, "sparsevlm", tokens=100)
    with pytest.raises(ValueError, match="layers must be increasing ints >= 0"):
        tome_plus.patch(model, "sparsevlm", layers=[2, 1])
    with pytest.raises(ValueError, match="prunes the output of one of the first 3 decoder layers of 4"):
        tome_plus.patch(model, "sparsevlm", layers=[0, 3])


def test_the_count_follows_the_rank_not_the_raters():
    """Raters whose attention rows repeat add no rank: 4 raters, rows of rank 2 -> int(2 scale + shift)
    kept (recycling off), per row of the batch, the top by the raters' mean."""
    from tome_plus.methods.base import LlmSite
    from tome_plus.methods.sparsevlm import SparseVlm
    torch.manual_seed(0)
    n, visual = 16, torch.zeros(2, 16, dtype=torch.bool)
    visual[:, 2:12] = True
    memo = torch.zeros_like(visual)
    memo[:, 12:16] = True
    base = torch.rand(2, 2, n)
    received = torch.cat([base, base[:, :1] * 2, base[:, 1:] + base[:, :1]], dim=1)  # rank 2 of 4 rows
    reducer = SparseVlm(SparseVlmConfig(scale=2.0, shift=1.0, recycle=False, layers=[0]))
    site = LlmSite(layer=0, hidden=torch.randn(2, n, 8), received=received, visual=visual, candidates=visual,
                   instruction=memo, valid=torch.ones_like(visual), prompt=torch.ones_like(visual),
                   spatial=torch.zeros(2, n), images=torch.ones(2, dtype=torch.long), index=torch.arange(n).expand(2, n),
                   memo=memo)
    keep = reducer.select(site)
    for b in range(2):
        score = received[b, :, 2:12].mean(0)
        want = set((score.argsort(descending=True)[:5] + 2).tolist())  # int(2 x 2 + 1)
        assert set((keep[b] & visual[b]).nonzero()[:, 0].tolist()) == want


@pytest.mark.parametrize("method,options", [("sparsevlm", {"layers": [0, 1], "scale": 1.0}),
                                            ("pyramiddrop", {"layers": [1, 2], "keep": 0.5})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selection_under_autocast_is_formed_in_float32(method, options, dtype, pixels, monkeypatch):
    """In a half forward each site's selection equals the one formed from its inputs upcast to
    float32 (exact): nothing the methods rank by is computed in half precision."""
    from dataclasses import replace
    from tome_plus.methods import get_method
    from tome_plus.methods.base import Recycled
    model = llava()
    tome_plus.patch(model, method, **options)
    cls = get_method(method)
    calls = []
    original = cls.select
    monkeypatch.setattr(cls, "select", lambda self, site: calls.append((site, original(self, site))) or calls[-1][1])
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert len(calls) == 2
    reducer = tome_plus.api.get_info(model).reducer
    for site, got in calls:
        want = original(reducer, replace(site, hidden=site.hidden.float(), received=site.received.float()))
        assert type(got) is type(want)
        if isinstance(got, Recycled):  # merged tokens too
            assert torch.equal(got.merged, want.merged) and torch.equal(got.rank, want.rank)
            got, want = got.keep, want.keep
        assert torch.equal(got, want)
