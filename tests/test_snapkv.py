"""kv="snapkv" (`kv/snapkv.py`): the prompt's cache compressed once after the prefill by the
observation window's votes, against the authors' procedure (FasterDecoding/SnapKV,
`SnapKVCluster.update_kv`) restated here as loops over the unpatched model's own attention."""
import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import tome_plus  # noqa: E402
from test_kv import TEXT, assert_prefill_keeps, greedy, llama, prompts  # noqa: E402
from tome_plus.kv.engine import cache_lengths  # noqa: E402


def authors_kept(model, ids, mask, budget, window, kernel, pooling):
    """Per layer, row and KV head, the slots SnapKV keeps: each row alone (its real tokens), the
    last `window` queries' probabilities summed over them (and the KV head's query group) for the
    tokens before the window, pooled `kernel` wide with zeros beyond both ends (max: those ends
    ignored), the top `budget - window` of those (ties to the higher own vote, then the earlier
    token) plus the window."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    groups = TEXT["num_attention_heads"] // TEXT["num_key_value_heads"]
    n, half = ids.shape[1], kernel // 2
    kept = []
    for probs in out.attentions:
        layer = []
        for b in range(ids.shape[0]):
            real = [k for k in range(n) if mask[b, k]]
            prefix, last = real[:-window], real[-window:]
            row = []
            for kv in range(TEXT["num_key_value_heads"]):
                vote = [sum(float(probs[b, h, q, k]) for q in last for h in range(kv * groups, (kv + 1) * groups))
                        for k in prefix]
                pooled = []
                for i in range(len(vote)):
                    around = [vote[j] for j in range(i - half, i + half + 1) if 0 <= j < len(vote)]
                    pooled.append(sum(around) / kernel if pooling == "avg" else max(around))
                best = sorted(range(len(prefix)), key=lambda i: (-pooled[i], -vote[i], i))[:budget - window]
                row.append(sorted([prefix[i] for i in best] + last))
            layer.append(row)
        kept.append(layer)
    return kept, out.past_key_values


@pytest.mark.parametrize("pooling,kernel", [("avg", 5), ("max", 3), ("avg", 1)])
def test_prefill_keeps_what_the_authors_keep(pooling, kernel):
    model = llama("eager")
    ids, mask = prompts()  # rows of 40 and 33 tokens, left-padded
    budget, window = 14, 4
    want, full = authors_kept(model, ids, mask, budget, window, kernel, pooling)
    tome_plus.patch(model, kv="snapkv", kv_options={"budget": budget, "window": window, "kernel": kernel,
                                                    "pooling": pooling})
    assert_prefill_keeps(model, ids, mask, budget, want, full)


def test_a_prompt_within_the_budget_is_not_compressed_and_decoding_appends():
    """Budget above the prompt: the unpatched greedy tokens (nothing pruned); with a budget, the
    cache holds `budget` tokens after the prefill and grows by one per decoded token."""
    model = llama("sdpa")
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    tome_plus.patch(model, kv="snapkv", kv_options={"budget": 64})
    assert torch.equal(greedy(model, ids, mask), ref)
    tome_plus.patch(model, kv="snapkv", kv_options={"budget": 12, "window": 4})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache)
        assert cache_lengths(cache) == [12] * TEXT["num_hidden_layers"]
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=cache)
    assert cache_lengths(cache) == [13] * TEXT["num_hidden_layers"]
    tome_plus.unpatch(model)
    assert torch.equal(greedy(model, ids, mask), ref)


@pytest.mark.parametrize("options,message", [
    ({"window": 0}, "window must be an int >= 1"),
    ({"recent": 8}, "give window=, not recent="),
    ({"kernel": 4}, "kernel must be an odd int"),
    ({"pooling": "median"}, "pooling must be one of avg, max"),
    ({"every": 2}, "snapkv compresses the prompt once"),
    ({"budget": 16, "window": 32}, "recent=32 is more than the budget 16"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        tome_plus.patch(llama(), kv="snapkv", kv_options=options)
