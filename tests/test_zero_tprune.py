"""Zero-TPrune against a plain reference (loops over tokens): WPR, head filter, I' -> S -> I."""
import math

import pytest
import torch

import tome_plus
from tome_plus.backends import timm_vit
from tome_plus.methods.zero_tprune import (ZeroTPrune, ZeroTPruneConfig, aggregate_heads, default_iters,
                                          head_variance)
from tome_plus.state import TokenState
from tome_plus.triton_kernels.pagerank import weighted_pagerank_torch

from conftest import PREFIX_MODELS, make


def naive_wpr(attn, iters, alive, init, has_cls):
    """One head: `attn` N x N nested lists; returns the score list."""
    n = len(attn)
    live = [i for i in range(n) if alive[i]]
    rows = {}
    for i in live:
        total = sum(attn[i][j] for j in live)
        rows[i] = {j: attn[i][j] / total for j in live}
    weight = {i: 1.0 for i in live}
    if init == "cls" and has_cls and alive[0]:
        weight[0] = math.sqrt(len(live))
    z = sum(weight.values())
    s = {i: weight[i] / z for i in live}
    for _ in range(iters):
        s = {j: sum(rows[i][j] * s[i] for i in live) for j in live}
    return [s.get(i, 0.0) for i in range(n)]


def naive_aggregate(per_head, alive, lo, hi, n_prefix=0, min_heads=0.0):
    """EIR + VHF: the variance of each head over the alive reducible tokens, scaled to mean 1."""
    live = [i for i in range(n_prefix, len(alive)) if alive[i]]
    n = len(live)
    distance = []
    for s in per_head:
        total = sum(s[i] for i in live)
        vals = [s[i] * n / total for i in live]
        mean = sum(vals) / n
        var = sum((v - mean) ** 2 for v in vals) / n
        distance.append(0.0 if lo <= var <= hi else math.log(lo / var) if var < lo else math.log(var / hi))
    heads = len(per_head)
    chosen = [h for h in range(heads) if distance[h] == 0.0]
    need = math.ceil(min_heads * heads)
    if need == 0:
        chosen = chosen or list(range(heads))
    else:
        nearest = sorted(range(heads), key=lambda h: (distance[h], h))[:need]
        chosen = sorted(set(chosen) | set(nearest))
    return [math.sqrt(sum(per_head[h][i] ** 2 for h in chosen) / len(chosen)) for i in range(len(alive))]


def naive_zero_tprune(attn, keys, k, n_prefix, iters, s_share=0.5, init="cls", var_range=(0.01, 0.7), min_heads=0.5):
    """One image: attn [H, N, N], keys [N, d]. Returns the sorted kept positions."""
    heads, n = attn.shape[0], attn.shape[-1]
    a = attn.tolist()
    body = n - n_prefix
    r_s = min(math.floor(k * s_share + 0.5), body // 2)  # half rounds up
    alive = [True] * n
    if r_s > 0:
        imp = naive_aggregate([naive_wpr(a[h], 1, alive, init, n_prefix > 0) for h in range(heads)], alive, *var_range,
                              n_prefix, min_heads)
        ranked = sorted(range(n_prefix, n), key=lambda i: imp[i])
        sources, targets = ranked[:body // 2], ranked[body // 2:]
        unit = keys / keys.norm(dim=-1, keepdim=True)
        best = {s: max(float(unit[s] @ unit[t]) for t in targets) for s in sources}
        for s in sorted(sources, key=lambda s: -best[s])[:r_s]:
            alive[s] = False
    imp = naive_aggregate([naive_wpr(a[h], iters, alive, init, n_prefix > 0) for h in range(heads)], alive, *var_range,
                          n_prefix, min_heads)
    candidates = sorted((i for i in range(n_prefix, n) if alive[i]), key=lambda i: -imp[i])
    return sorted(list(range(n_prefix)) + candidates[:n - k - n_prefix])


def state_for(layer, depth, n_prefix):
    return TokenState(reducer=None, removals=(0,) * depth, n_prefix=n_prefix, has_cls=n_prefix > 0,
                      prop_attn=False, batch=1, n_input=0, layer=layer)


@pytest.mark.parametrize("n,n_prefix,k,layer,s_share", [(13, 1, 4, 0, 0.5), (20, 1, 9, 5, 0.5), (18, 2, 6, 11, 1.0),
                                                         (16, 0, 5, 4, 0.0), (25, 5, 7, 2, 0.3)])
def test_plan_matches_naive(n, n_prefix, k, layer, s_share):
    torch.manual_seed(n * 7 + k)
    batch, heads, depth = 2, 3, 12
    # a spread of head temperatures so the variance filter keeps some heads and drops others
    temps = torch.tensor([0.3, 1.0, 4.0]).view(1, heads, 1, 1)
    attn = (torch.randn(batch, heads, n, n) * temps).softmax(-1)
    keys = torch.randn(batch, n, 8)
    reducer = ZeroTPrune(ZeroTPruneConfig(r=k, s_share=s_share))
    reducer.check(depth)
    plan = reducer.plan({"attn": attn, "keys": keys}, state_for(layer, depth, n_prefix), k)
    assert plan.src is None  # pruning never merges
    for b in range(batch):
        expected = naive_zero_tprune(attn[b], keys[b], k, n_prefix, default_iters(depth)[layer], s_share)
        assert plan.keep[b].tolist() == expected


@pytest.mark.parametrize("n_prefix", [0, 1, 5])
@pytest.mark.parametrize("min_heads", [0.0, 0.5, 1.0])
def test_head_filter_matches_naive(n_prefix, min_heads):
    torch.manual_seed(n_prefix)
    heads, n = 6, 14
    attn = (torch.randn(2, heads, n, n) * torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0]).view(1, heads, 1, 1)).softmax(-1)
    # the prefix soaks up mass, as a class token does, and must not set the variance
    attn[..., :n_prefix] += 2.0
    attn = attn / attn.sum(-1, keepdim=True)
    alive = torch.ones(2, n, dtype=torch.bool)
    alive[1, n_prefix + 1::3] = False
    reducer = ZeroTPrune(ZeroTPruneConfig(r=1, min_heads=min_heads))
    for b in range(2):
        got = reducer.importance(attn[b:b + 1], 5, alive[b:b + 1], int(n_prefix > 0), n_prefix)[0]
        per_head = [naive_wpr(attn[b, h].tolist(), 5, alive[b].tolist(), "cls", n_prefix > 0) for h in range(heads)]
        want = naive_aggregate(per_head, alive[b].tolist(), 0.01, 0.7, n_prefix, min_heads)
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-7)


def test_head_filter_leaves_the_prefix_out_and_fills_up_to_min_heads():
    torch.manual_seed(0)
    attn = (torch.randn(1, 4, 10, 10) * torch.tensor([0.1, 1.0, 3.0, 8.0]).view(1, 4, 1, 1)).softmax(-1)
    scores, _ = weighted_pagerank_torch(attn, 5)
    body_var = head_variance(scores, None, 1)
    # a class token holding most of the mass does not change the statistic
    heavy = scores.clone()
    heavy[..., 0] = 50 * heavy[..., 1:].sum(-1)
    torch.testing.assert_close(head_variance(heavy, None, 1), body_var)
    inside = ((body_var >= 0.01) & (body_var <= 0.7))[0]
    assert 0 < inside.sum() < 4  # the case exercises the filter
    rms = lambda heads: scores[:, heads].square().mean(1).sqrt()
    torch.testing.assert_close(aggregate_heads(scores, body_var, (0.01, 0.7)), rms(inside.nonzero()[:, 0]))
    # nothing passes: min_heads=0 takes every head, min_heads=0.5 the two nearest the range
    far = (100.0, 200.0)
    torch.testing.assert_close(aggregate_heads(scores, body_var, far), rms(torch.arange(4)))
    nearest = body_var[0].argsort(descending=True)[:2].sort().values  # all lie below: the largest are nearest
    torch.testing.assert_close(aggregate_heads(scores, body_var, far, 0.5), rms(nearest))


def test_default_iterations():
    assert default_iters(12) == [30, 30, 30, 5, 5, 5, 5, 5, 5, 1, 1, 1]


@pytest.mark.parametrize("name,kwargs", PREFIX_MODELS)
@torch.no_grad()
def test_model_identity_and_invariants(name, kwargs, images):
    model = make(name, **kwargs)
    ref = model(images)
    tome_plus.patch(model, "zero_tprune", r=0)
    assert torch.equal(model(images), ref)
    p = model.num_prefix_tokens
    tome_plus.patch(model, "zero_tprune", r=12, layers=[2, 5, 8], trace_source=True)
    model(images)
    info = tome_plus.inspect(model)
    n0 = info.input_tokens
    assert list(info.tokens) == [n0] * 2 + [n0 - 12] * 3 + [n0 - 24] * 3 + [n0 - 36] * 4
    assert torch.equal(info.size, torch.ones(2, n0 - 36, 1))  # pruning: sizes stay 1
    assert torch.equal(info.source.sum(-1, keepdim=True), info.size)
    assert int(info.source.sum()) == 2 * (n0 - 36)  # pruned patches are held by nobody
    assert torch.equal(info.source[:, :p, :p], torch.eye(p).expand(2, -1, -1))


def test_attention_probabilities_only_in_pruning_layers(monkeypatch, images):
    model = make("vit_tiny_patch16_224")
    seen = []
    original = timm_vit.attention_with_signals

    def spy(attn, x, state, needs, owner):
        seen.append("attn" in needs)
        return original(attn, x, state, needs, owner)

    monkeypatch.setattr(timm_vit, "attention_with_signals", spy)
    tome_plus.patch(model, "zero_tprune", r=8, layers=[3, 9])
    with torch.no_grad():
        model(images)
    assert [i for i, explicit in enumerate(seen) if explicit] == [3, 9]


def test_flops_budget_prunes_only_in_chosen_layers():
    model = make("vit_tiny_patch16_224")
    tome_plus.patch(model, "zero_tprune", flops=0.7, layers=[1, 4, 7])
    removals = tome_plus.backends.base.get_info(model).removals(197)
    assert [i for i, r in enumerate(removals) if r] == [1, 4, 7]


@pytest.mark.parametrize("options,match", [
    ({"layers": [3, 12]}, "do not exist"), ({"layers": [-1]}, "do not exist"), ({"iters": [0] * 12}, "positive"),
    ({"iters": [2.5] * 12}, "positive"), ({"iters": [5] * 11}, "12"), ({"s_share": 1.5}, "s_share"),
    ({"init": "random"}, "init"), ({"var_range": (0.7, 0.01)}, "var_range"), ({"var_range": (0.1,)}, "var_range"),
    ({"s_share": True}, "s_share"), ({"layers": 3}, "layers"),
])
def test_clear_errors(options, match):
    model = make("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=match):
        tome_plus.patch(model, "zero_tprune", r=4, **options)


@torch.no_grad()
def test_forward_matches_a_loop_over_timm_block_parts(images):
    """The patched forward equals a loop over timm's own block parts that prunes between the
    pruning block's attention and MLP."""
    model = make("vit_tiny_patch16_224", depth=3)
    tome_plus.patch(model, "zero_tprune", r=20, layers=[1])
    got = model(images)
    info = tome_plus.backends.base.get_info(model)
    reducer, n_remove = info.reducer, info.removals(197)[1]
    tome_plus.unpatch(model)
    x = model._pos_embed(model.patch_embed(images))
    for i, blk in enumerate(model.blocks):
        if i != 1:
            x = blk(x)
            continue
        attn = blk.attn
        b, n, c = x.shape
        q, k, v = attn.qkv(blk.norm1(x)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        x = x + blk.ls1(attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c)))
        state = TokenState(reducer=reducer, removals=(0, n_remove, 0), n_prefix=1, has_cls=True, prop_attn=False,
                           batch=b, n_input=n, layer=1)
        keep = reducer.plan({"attn": probs, "keys": k.mean(1)}, state, n_remove).keep
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, c))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    want = model.forward_head(model.norm(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_site_block_same_answer_paper_cost(images):
    """Pruning commutes with the row-wise MLP: "block" (the paper's place) returns what "attn"
    returns for the same counts, and counts the pruning block's MLP at full length, so the same
    FLOPs target removes more tokens there."""
    assert ZeroTPruneConfig().prune_at == "attn"
    outs, counts = {}, {}
    for site in ("block", "attn"):
        model = make("vit_tiny_patch16_224", depth=4)
        tome_plus.patch(model, "zero_tprune", r=20, layers=[1, 2], prune_at=site)
        with torch.no_grad():
            outs[site] = model(images)
        tome_plus.patch(model, "zero_tprune", flops=0.6, layers=[1, 2], prune_at=site)
        counts[site] = tome_plus.backends.base.get_info(model).removals(197)
    torch.testing.assert_close(outs["block"], outs["attn"], rtol=1e-5, atol=1e-6)
    assert sum(counts["block"]) > sum(counts["attn"])
    with pytest.raises(ValueError, match="prune_at"):
        tome_plus.patch(make("vit_tiny_patch16_224"), "zero_tprune", r=4, prune_at="mlp")
    with pytest.raises(ValueError, match="min_heads"):
        tome_plus.patch(make("vit_tiny_patch16_224"), "zero_tprune", r=4, min_heads=2)


def whole_graph(graph):
    """A features site's graph formed whole, as it was before it was formed as read: every query
    head given its own copy of its KV head, all heads' logits at once, then the softmax."""
    from tome_plus.precision import fp32_logits
    k = graph.k.repeat_interleave(graph.q.shape[1] // graph.k.shape[1], dim=1)
    return fp32_logits(graph.q, k, graph.scaling).softmax(dim=-1)


def masked_matrix_wpr(attn, iters, alive, init, n_cls):
    """The weighted PageRank as it was computed before the row factors moved onto s: the renormalised,
    masked matrix formed, then `iters` products with it (the graph formed whole first)."""
    from tome_plus.triton_kernels.pagerank import initial_scores
    attn = whole_graph(attn) if hasattr(attn, "heads") else attn
    batch, heads, n, _ = attn.shape
    alive = torch.ones(batch, n, dtype=torch.bool) if alive is None else alive
    a = attn.float() * alive[:, None, None, :].float()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    a = a * alive[:, None, :, None].float()
    s = initial_scores(alive, init, n_cls)[:, None, :].expand(batch, heads, n).contiguous()
    for _ in range(iters):
        s = (s.unsqueeze(-2) @ a).squeeze(-2)
    return s, torch.zeros(batch, heads)


def test_the_unformed_matrix_chooses_the_tokens_the_formed_one_chose(monkeypatch):
    """Zero-TPrune at a VLM's features site (980-token-like pools: a tiny NeXT's images, 30
    iterations) keeps exactly the tokens it kept when the renormalised matrix was formed, on the
    whole attention graph with the S-stage's survivors masked (not the survivors' own graph)."""
    pytest.importorskip("transformers")
    import vlm_models as V
    from tome_plus.llm import features
    from tome_plus.methods import zero_tprune as Z
    from tome_plus.triton_kernels import pagerank
    kept = {}
    for name, twin in (("formed", masked_matrix_wpr), ("unformed", None)):
        if twin is not None:
            monkeypatch.setattr(Z, "weighted_pagerank", twin)
            whole = features.image_attention
            monkeypatch.setattr(features, "image_attention", lambda *a: whole_graph(whole(*a)))
        else:
            monkeypatch.undo()
            monkeypatch.setattr(pagerank, "CACHE_BYTES", 1)  # the graph formed and iterated one head at a time
        model = V.FACTORIES["llava_next"](text_config={"num_hidden_layers": 2})
        inputs = V.INPUTS["llava_next"](model)
        tome_plus.patch(model, "zero_tprune", site="features", keep=0.5)
        with torch.no_grad():
            model(**inputs)
        kept[name] = tome_plus.inspect(model).llm_positions[0]
    assert torch.equal(kept["formed"], kept["unformed"])
    # and on random attention graphs, pools of several sizes, survivors masked
    torch.manual_seed(0)
    for n in (50, 300):
        attn = torch.randn(2, 4, n, n).softmax(dim=-1)
        alive = torch.rand(2, n) > 0.3
        for iters in (1, 30):
            new, _ = weighted_pagerank_torch(attn, iters, alive, "uniform", 0)
            old, _ = masked_matrix_wpr(attn, iters, alive, "uniform", 0)
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-7)
            assert torch.equal(new.argsort(dim=-1, descending=True, stable=True)[..., :n // 3],
                               old.argsort(dim=-1, descending=True, stable=True)[..., :n // 3])


def test_a_graph_formed_as_read_is_the_whole_graph():
    """The features site's graph, formed a few heads at a time into one reused buffer (grouped-query
    keys, half inputs too), is the whole graph's heads bit for bit; the graph among some tokens is
    the whole graph's rows renormalised over them."""
    from tome_plus.llm.features import AttentionGraph
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = torch.randn(2, 6, 40, 8).to(dtype), torch.randn(2, 3, 40, 8).to(dtype)
        graph = AttentionGraph(q, k, 8 ** -0.5)
        whole = whole_graph(graph)
        for start, stop in ((0, 4), (4, 6), (1, 3)):
            assert torch.equal(graph.heads(start, stop), whole[:, start:stop])
        assert torch.equal(graph.full(), whole)
        index = torch.stack([torch.randperm(40)[:25].sort().values for _ in range(2)])
        among = graph.among(index).heads(0, 6)
        rows = whole.gather(2, index[:, None, :, None].expand(2, 6, 25, 40)).gather(3, index[:, None, None, :].expand(2, 6, 25, 25))
        torch.testing.assert_close(among, rows / rows.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)


def test_the_survivors_graph_keeps_the_tokens_of_the_masked_whole_graph(monkeypatch):
    """Zero-TPrune's I-stage on a graph formed as read runs on the survivors' own graph: the same
    tokens as the whole graph with the survivors masked (several pool sizes, grouped-query keys,
    the graph formed one head at a time)."""
    from tome_plus.llm.features import AttentionGraph, reduce_sets
    from tome_plus.methods.zero_tprune import ZeroTPrune, ZeroTPruneConfig
    from tome_plus.triton_kernels import pagerank
    monkeypatch.setattr(pagerank, "CACHE_BYTES", 1)
    reducer = ZeroTPrune(ZeroTPruneConfig(keep=0.5))
    reducer.check(4)
    torch.manual_seed(0)
    for n in (60, 300):
        q, k, x = torch.randn(2, 4, n, 16) * 2, torch.randn(2, 2, n, 16) * 2, torch.randn(2, n, 32)
        pick = lambda t, index: t.gather(2, index[:, None, :, None].expand(2, t.shape[1], index.shape[1], 16))
        graph = lambda index: AttentionGraph(pick(q, index), pick(k, index), 0.25)
        formed = reduce_sets(x, reducer, n // 2, lambda _, index: whole_graph(graph(index)))[1]
        read = reduce_sets(x, reducer, n // 2, lambda _, index: graph(index))[1]
        assert torch.equal(read, formed)


def test_the_cpu_twin_iterates_a_few_heads_at_a_time_alike(monkeypatch):
    """Heads iterated in cache-sized groups give the products of all heads at once (to rounding: a
    BLAS may sum a batch of products in another order than a smaller batch), and the same ranks."""
    from tome_plus.triton_kernels import pagerank
    torch.manual_seed(1)
    attn = torch.randn(2, 6, 40, 40).softmax(dim=-1)
    alive = torch.rand(2, 40) > 0.2
    together, _ = weighted_pagerank_torch(attn, 12, alive, "cls", 1)
    monkeypatch.setattr(pagerank, "CACHE_BYTES", 40 * 40 * 4 * 2)  # two heads at a time
    grouped = weighted_pagerank_torch(attn, 12, alive, "cls", 1)[0]
    torch.testing.assert_close(grouped, together, rtol=1e-6, atol=1e-9)
    assert torch.equal(grouped.argsort(dim=-1, stable=True), together.argsort(dim=-1, stable=True))
