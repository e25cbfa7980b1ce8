"""VisionZip (`methods/visionzip.py`): at LLaVA-1.5's tower site, the image features the LLM receives
equal the authors' selection (dvlab-research/VisionZip, `CLIPVisionTower_VisionZip.forward`,
restated here) on the unpatched tower's outputs; without a class token (the features site) the
plan equals a plain loop over the rule; budgets, identity and refusals."""
import pytest
import torch

pytest.importorskip("transformers")

import tome_plus  # noqa: E402
from tome_plus.methods.visionzip import VisionZip, VisionZipConfig, split  # noqa: E402
from tome_plus.state import TokenState  # noqa: E402
from test_hf import N_IMAGE, greedy, llava, pixels, prompts  # noqa: E402,F401


def authors_visionzip(hidden, attn, metric, dominant_num, contextual_num):
    """Their tower forward after the run, step by step (`dominant_num`: their `dominant - 1`)."""
    cls_attention = attn[:, :, 0, 1:]
    topk_indices = cls_attention.sum(dim=1).topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(hidden.shape[0], 1, dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(hidden.shape[0], dominant_num + 1, -1)
    metric_filtered = metric[mask].view(hidden.shape[0], hidden.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(hidden.shape[0], -1, hidden.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
    assign = torch.zeros(hidden.shape[0], int(others.sum()), contextual_num, dtype=hidden.dtype)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, others, :]) / counts
    contextual = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual], dim=1)


def reference_features(model, px, tokens):
    """The LLM's image tokens under the authors' code: their selection on the unpatched tower's
    layer -2 (its eager attention, its head-averaged raw keys), then the projector."""
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        out = tower(px, output_hidden_states=True, output_attentions=True)
        layer = tower.encoder.layers[-2] if hasattr(tower, "encoder") else tower.vision_model.encoder.layers[-2]
        h = layer.layer_norm1(out.hidden_states[-3])
        b, n, _ = h.shape
        metric = layer.self_attn.k_proj(h).view(b, n, layer.self_attn.num_heads, -1).mean(dim=2)
        contextual = split(tokens, None)
        chosen = authors_visionzip(out.hidden_states[-2], out.attentions[-2], metric, tokens - contextual - 1,
                                   contextual)
        tower.config._attn_implementation = "sdpa"
        return model.model.multi_modal_projector(chosen)


@pytest.mark.parametrize("tokens", [12, 20, 40])
def test_tower_site_gives_the_authors_features(tokens, pixels):
    model = llava()
    ref = reference_features(model, pixels, tokens)
    tome_plus.patch(model, "visionzip", tokens=tokens)
    with torch.no_grad():
        got = model.model.get_image_features(pixel_values=pixels).pooler_output
    got = torch.stack(list(got)) if isinstance(got, (list, tuple)) else got.view(ref.shape)
    assert got.shape == ref.shape == (2, tokens, ref.shape[-1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_tower_site_generates_and_keeps_everything_at_full_budget(pixels):
    model = llava()
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    ref_tokens = greedy(model, ids, mask, pixels)
    tome_plus.patch(model, "visionzip", tokens=N_IMAGE)  # every patch: nothing selected, nothing merged
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)
    tome_plus.patch(model, "visionzip", tokens=16)
    assert torch.equal(greedy(model, ids, mask, pixels), greedy(model, ids, mask, pixels, use_cache=False))
    info = tome_plus.inspect(model)
    assert info.removals == (0, 0, N_IMAGE - 16, 0)  # once, in the feature layer (-2)
    assert torch.equal(info.image_tokens, torch.full((2,), 16))
    tome_plus.unpatch(model)
    assert torch.equal(greedy(model, ids, mask, pixels), ref_tokens)


def loop_plan(attn, keys, x, n_keep, contextual):
    """The rule without a class token, token by token in Python: dominance = attention received
    (summed over heads, averaged over queries); the others in index order; targets every `step`-th;
    each other joins its most cosine-similar target (the first on ties); target + mean(joined)."""
    n = x.shape[0]
    score = attn.sum(dim=0).mean(dim=0).tolist()
    dominant = sorted(sorted(range(n), key=lambda i: -score[i])[:n_keep - contextual])
    others = [i for i in range(n) if i not in dominant]
    step = max(1, len(others) // max(contextual, 1))
    targets = others[::step][:contextual]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    joined = {t: [] for t in targets}
    for i in others if targets else []:  # no targets: the others are dropped
        if i in targets:
            continue
        sims = [float(unit[i] @ unit[t]) for t in targets]
        joined[targets[sims.index(max(sims))]].append(i)
    rows = [x[i] for i in dominant]
    for t in targets:
        rows.append(x[t] + (torch.stack([x[i] for i in joined[t]]).mean(dim=0) if joined[t] else 0))
    return torch.stack(rows)


@pytest.mark.parametrize("n,n_keep,contextual", [(30, 8, 2), (17, 10, 3), (12, 4, 0), (9, 3, 1)])
def test_plan_without_class_token_equals_a_loop(n, n_keep, contextual):
    torch.manual_seed(n)
    x, keys = torch.randn(2, n, 8), torch.randn(2, n, 5)
    attn = torch.randn(2, 3, n, n).softmax(dim=-1)
    reducer = VisionZip(VisionZipConfig(tokens=n_keep, contextual=contextual))
    state = TokenState(reducer=reducer, removals=(n - n_keep,), n_prefix=0, has_cls=False, prop_attn=False,
                       batch=2, n_input=n, device=x.device)
    from tome_plus.merging import apply_plan
    plan = reducer.plan({"attn": attn, "keys": keys, "x": x}, state, n - n_keep)
    got, state = apply_plan(plan, x, state)
    for b in range(2):
        torch.testing.assert_close(got[b], loop_plan(attn[b], keys[b], x[b], n_keep, contextual))
    if contextual:  # every input token is counted once: kept, or merged into a target
        assert torch.equal(state.size.sum(dim=1).squeeze(-1), torch.full((2,), float(n)))


def test_budget_split_is_the_authors():
    assert [(t - split(t, None), split(t, None)) for t in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split(1, None) == 0 and split(5, 9) == 4


def test_refusals(pixels):
    model = llava()
    with pytest.raises(ValueError, match="contextual must be an int >= 0"):
        tome_plus.patch(model, "visionzip", tokens=8, contextual=-1)
    with pytest.raises(ValueError, match="one number, not a per-layer list"):
        tome_plus.patch(model, "visionzip", keep=[0.5, 0.5])
    with pytest.raises(ValueError, match="'full' feature selection sends already"):
        tome_plus.patch(llava(strategy="full"), "visionzip", tokens=8)
    tome_plus.patch(llava(strategy="full"), "visionzip", tokens=8, cls_token=False)
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
    with pytest.raises(TypeError, match="'visionzip' selects the image tokens .* or the tower's feature layer.*no such"):
        tome_plus.patch(vit, "visionzip", tokens=8)
    with pytest.raises(TypeError, match="'visionzip' selects the image tokens"):  # a tower alone
        tome_plus.patch(model.model.vision_tower, "visionzip", tokens=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_plan_under_autocast_is_formed_in_float32(dtype, pixels):
    """In a half tower the plan equals the one formed from its signals upcast to float32 (exact)."""
    from test_precision import recorded_plans
    model = llava()
    tome_plus.patch(model, "visionzip", tokens=12)
    with recorded_plans(model) as calls, torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        model.model.get_image_features(pixel_values=pixels)
    assert len(calls) == 1  # once, in the feature layer
    reducer = tome_plus.api.get_info(model).reducer
    for signals, state, n_remove, plan in calls:
        want = type(reducer).plan(reducer, {k: s.float() for k, s in signals.items()}, state, n_remove)
        for field in ("keep", "src", "dst"):
            assert torch.equal(getattr(plan, field), getattr(want, field)), field
