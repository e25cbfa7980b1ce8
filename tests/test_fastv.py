"""FastV inside the LLM of a tiny random LLaVA (Llama text model, 4 layers)."""
import math

import pytest
import torch

pytest.importorskip("transformers", reason='FastV tests need transformers: pip install -e ".[hf]"')

import tome_plus  # noqa: E402
from tome_plus.methods.atp import top_fraction  # noqa: E402

from test_atp import check_keeping_everything  # noqa: E402
from test_atp import fa2_standin  # noqa: E402,F401 (the fixture: flash attention as a CPU can run it)
from test_hf import IMAGE_ID, N_IMAGE, greedy, llava, prompts  # noqa: E402


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def test_top_fraction_keeps_the_top_visual_tokens_ties_by_position():
    score = torch.tensor([[9.0, 1.0, 3.0, 3.0, 2.0, 0.0]])
    visual = torch.tensor([[False, True, True, True, True, False]])
    keep = top_fraction(score, visual, 0.5)  # 2 of 4: the 3.0 pair, the earlier first on a tie
    assert keep.tolist() == [[True, False, True, True, False, True]]
    assert top_fraction(score, visual, 0.25).tolist() == [[True, False, True, False, False, True]]


def test_keeping_everything_gives_the_unpatched_tokens_and_logits(pixels):
    model, ids, mask, ref_logits = check_keeping_everything(pixels, lambda m: tome_plus.patch(m, "fastv", keep=1.0),
                                                            sites=1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref_logits)


@pytest.mark.parametrize("rank", ["mean", "last"])
@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_cache_padding_and_counts(rank, keep, pixels):
    model = llava()
    tome_plus.patch(model, "fastv", k=2, keep=keep, rank=rank)
    ids, mask = prompts((3, 5), (1, 2))
    cached = greedy(model, ids, mask, pixels)
    assert torch.equal(tome_plus.inspect(model).llm_kept, torch.full((1, 2), math.ceil(keep * N_IMAGE)))
    assert torch.equal(greedy(model, ids, mask, pixels, use_cache=False), cached)
    for row in range(2):  # each row of the left-padded batch generates what it does alone
        alone_ids, alone_mask = prompts([(3, 5), (1, 2)][row])
        alone = greedy(model, alone_ids, alone_mask, pixels[row:row + 1])
        assert torch.equal(alone[0, -5:], cached[row, -5:])


def reference_positions(ids, attentions, keep, rank, count=None):
    """Per row, the image positions FastV keeps, from an unpatched model's eager attention;
    `count(n)`: how many of n are kept (default ceil(keep n))."""
    count = count or (lambda n: math.ceil(keep * n))
    out = []
    for row in range(ids.shape[0]):
        attn = attentions[row].mean(dim=0)  # [L, L] over heads
        image = (ids[row] == IMAGE_ID).nonzero().flatten().tolist()
        if rank == "mean":  # received, averaged over all queries
            score = {j: float(attn[:, j].mean()) for j in image}
        else:  # the last token's row
            score = {j: float(attn[-1, j]) for j in image}
        top = sorted(image, key=lambda j: (-score[j], j))[:count(len(image))]
        out.append(sorted(top))
    return out


@pytest.mark.parametrize("rank", ["mean", "last"])
@pytest.mark.parametrize("k", [1, 2])
def test_kept_positions_equal_a_naive_reference(rank, k, pixels):
    ids, mask = prompts((3, 5), (3, 5))  # no padding: position ids are the token indices
    eager = llava()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                           output_attentions=True).attentions[k - 1]  # the K-th layer's (index k - 1)
    expected = reference_positions(ids, attentions, 0.5, rank)
    model = llava()
    tome_plus.patch(model, "fastv", k=k, keep=0.5, rank=rank)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    positions = tome_plus.inspect(model).llm_positions
    assert len(positions) == 1
    for row in range(2):
        kept = positions[0][row][positions[0][row] >= 0].tolist()
        assert [p for p in kept if ids[row, p] == IMAGE_ID] == expected[row]
        assert [p for p in kept if ids[row, p] != IMAGE_ID] == (ids[row] != IMAGE_ID).nonzero().flatten().tolist()


@pytest.mark.parametrize("options", [{"preset": "authors_code"}, {"rank": "last", "rounding": "round"}])
def test_the_authors_code_variant_ranks_by_the_last_row_and_rounds(options, pixels):
    """The authors' code: the last token's row and round(keep n) (half to even), where the paper's
    rule takes ceil: 0.3 x 64 keeps 19, not 20; 0.5 x 64 keeps 32 both ways."""
    ids, mask = prompts((3, 5), (3, 5))
    eager = llava()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                           output_attentions=True).attentions[1]
    for keep, n_kept in ((0.3, 19), (0.5, 32)):
        assert round(keep * N_IMAGE) == n_kept
        expected = reference_positions(ids, attentions, keep, "last", count=lambda n: round(keep * n))
        model = llava()
        tome_plus.patch(model, "fastv", k=2, keep=keep, **options)
        assert (tome_plus.inspect(model).config["rank"], tome_plus.inspect(model).config["rounding"]) == ("last", "round")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        assert tome_plus.inspect(model).llm_kept.tolist() == [[n_kept, n_kept]]
        positions = tome_plus.inspect(model).llm_positions[0]
        for row in range(2):
            kept = positions[row][positions[row] >= 0].tolist()
            assert [p for p in kept if ids[row, p] == IMAGE_ID] == expected[row]
    with pytest.raises(ValueError, match="preset must be one of"):
        tome_plus.patch(llava(), "fastv", preset="authors")
    with pytest.raises(ValueError, match="rounding must be one of"):
        tome_plus.patch(llava(), "fastv", rounding="floor")


def test_the_two_rank_rules_differ(pixels):
    ids, mask = prompts((3, 5), (3, 5))
    kept = {}
    for rank in ("mean", "last"):
        model = llava()
        tome_plus.patch(model, "fastv", keep=0.5, rank=rank)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept[rank] = tome_plus.inspect(model).llm_positions[0]
    assert not torch.equal(kept["mean"], kept["last"])


@pytest.mark.parametrize("impl", ["eager", "flex_attention", "fa2"])
def test_every_attention_backend_prunes_alike(impl, fa2_standin, pixels):
    ids, mask = prompts((3, 5), (1, 2))
    ref_model = llava()
    tome_plus.patch(ref_model, "fastv", keep=0.5)
    ref = greedy(ref_model, ids, mask, pixels)
    model = llava()
    model.set_attn_implementation(fa2_standin if impl == "fa2" else impl)
    tome_plus.patch(model, "fastv", keep=0.5)
    assert torch.equal(greedy(model, ids, mask, pixels), ref)
    assert torch.equal(tome_plus.inspect(model).llm_positions[0], tome_plus.inspect(ref_model).llm_positions[0])
    assert torch.equal(greedy(model, ids, mask, pixels, use_cache=False), ref)


def test_unpatch_restores_and_errors(pixels):
    model = llava()
    keys = set(model.state_dict())
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    tome_plus.patch(model, "fastv", k=2, keep=0.25)
    assert set(model.state_dict()) == keys  # nothing trainable
    tome_plus.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)
    with pytest.raises(ValueError, match="k=4"):
        tome_plus.patch(llava(), "fastv", k=4)
    with pytest.raises(ValueError, match="rank"):
        tome_plus.patch(llava(), "fastv", rank="first")
    with pytest.raises(ValueError, match="one keep fraction"):
        tome_plus.patch(llava(), "fastv", r=4)


def test_nothing_to_train(pixels):
    from tome_plus.llm.context import collecting
    model = llava()
    tome_plus.patch(model, "fastv")
    ids, mask = prompts((3, 5), (3, 5))
    with pytest.raises(ValueError, match="nothing to train"), collecting():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)


@pytest.mark.parametrize("stop", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_received_attention_in_blocks_equals_the_whole_attention(dtype, stop, monkeypatch):
    """The scores' input formed a block of queries at a time (grouped-query keys, cached keys,
    a padded row, several blocks; `stop`: each block's keys stop at its last query) equals the
    full attention's, computed in float64 from the same (half) values, summed with the weights."""
    from tome_plus.llm import attention
    torch.manual_seed(0)
    batch, heads, kv, n, past, dim = 2, 4, 2, 9, 3, 8
    query = torch.randn(batch, heads, n, dim).to(dtype)
    key = torch.randn(batch, kv, past + n, dim).to(dtype)
    valid = torch.ones(batch, past + n, dtype=torch.bool)
    valid[1, :5] = False  # a left-padded row
    causal = torch.ones(n, past + n, dtype=torch.bool).tril(past)
    mask = (valid[:, None, :] & causal)[:, None]
    mask[1, 0, torch.arange(2), past + torch.arange(2)] = True  # padding rows see themselves (as segment_mask)
    weights = torch.rand(batch, 2, n)
    monkeypatch.setattr(attention, "BLOCK", batch * heads * (past + n) * 2)  # blocks of 2 queries
    got = attention.received_attention(query, key, mask, dim ** -0.5, weights, past, causal=stop)
    # the reference: the whole attention, float64, each query head with its own copy of its kv head
    q, k = query.double(), key.double()[:, torch.arange(heads) // (heads // kv)]
    logits = (q @ k.transpose(-2, -1)) * dim ** -0.5
    probs = logits.masked_fill(~mask, -math.inf).softmax(-1).mean(1)[..., -n:]  # [B, N queries, N keys]
    want = torch.stack([torch.stack([(weights[b, r, :, None].double() * probs[b]).sum(0) for r in range(2)])
                        for b in range(batch)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_the_scoring_layer_keeps_the_fused_attention(pixels, monkeypatch):
    """Every decoder layer's output comes from the model's backend (SDPA here), the scoring layer's
    too; the scores' logits are formed in blocks no larger than BLOCK."""
    from transformers import AttentionInterface
    from tome_plus.llm import attention
    calls, blocks = [], []
    sdpa = AttentionInterface._global_mapping["sdpa"]
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa",
                        lambda module, *a, **k: calls.append(type(module).__name__) or sdpa(module, *a, **k))
    logits = attention.fp32_logits
    monkeypatch.setattr(attention, "BLOCK", 800)
    monkeypatch.setattr(attention, "HALF", (torch.float32,))  # route fp32 through fp32_logits to watch the blocks
    monkeypatch.setattr(attention, "fp32_logits", lambda q, k, s: blocks.append(q.shape) or logits(q, k, s))
    model = llava()
    tome_plus.patch(model, "fastv", keep=0.5)
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    # the 4 decoder layers, the scoring layer (k=2: index 1) among them
    assert sum("Llama" in name for name in calls) == 4
    n = ids.shape[1]  # the tower reduces nothing: the prompt as given
    text = model.config.text_config
    groups = text.num_attention_heads // text.num_key_value_heads  # a KV head's query heads: one block of rows
    assert len(blocks) > 1 and sum(shape[2] for shape in blocks) == n * groups  # every query once, in blocks
    assert all(shape[0] * shape[1] * shape[2] * n <= 800 for shape in blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_per_weighting_forms_that_row_alone_and_equals_the_whole(dtype):
    """rank="last": the scoring layer forms only the weighted query's probabilities (`one`); the
    attention received equals the blockwise sum over every query with the same one-hot weights."""
    from tome_plus.llm import attention
    torch.manual_seed(1)
    batch, heads, kv, n, past, dim = 2, 4, 2, 9, 3, 8
    query = torch.randn(batch, heads, n, dim).to(dtype)
    key = torch.randn(batch, kv, past + n, dim).to(dtype)
    valid = torch.ones(batch, past + n, dtype=torch.bool)
    valid[1, :5] = False
    mask = (valid[:, None, :] & torch.ones(n, past + n, dtype=torch.bool).tril(past))[:, None]
    one = torch.tensor([[n - 1, 4], [n - 1, 6]])  # two weightings, one query each, per row
    weights = torch.zeros(batch, 2, n).scatter_(2, one.unsqueeze(-1), torch.tensor([[[1.0], [0.5]], [[1.0], [2.0]]]))
    whole = attention.received_attention(query, key, mask, dim ** -0.5, weights, past)
    alone = attention.received_attention(query, key, mask, dim ** -0.5, weights, past, one=one)
    torch.testing.assert_close(alone, whole, rtol=1e-5, atol=1e-6)
    assert bool((alone[:, :, :4] > 0).any())  # it could fail: visual columns receive attention
