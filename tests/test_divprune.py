"""DivPrune (`methods/divprune.py`): the greedy max-min diversity selection, against the authors'
procedure (vbdi/divprune, `LlavaMetaForCausalLM.DivPrune`, restated here) and a plain loop over the
paper's definition; at the features site of a VLM, the unpatched language model run on the rows
it keeps."""
import math

import pytest
import torch

import tome_plus
from tome_plus.methods.divprune import DivPrune, DivPruneConfig, max_min_diverse


def authors_selection(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """The authors' selection, step by step as their code runs it: a cosine-distance matrix; the
    first token by the second-smallest entry of each column (the smallest is its own distance);
    then the largest of each column's minimum over the rows already chosen."""
    count = int(round(ratio * features.shape[0]))
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()
    chosen = torch.empty(count, dtype=torch.long)
    for i in range(count):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.index_select(distance, 0, chosen[:i]).min(dim=0).values
        chosen[i] = torch.argmax(scores)
    return chosen


def definition_selection(features: torch.Tensor, count: int) -> list:
    """The paper's greedy MMDP solver written from its definition, in plain Python floats."""
    rows = features.double().tolist()
    norm = [math.sqrt(sum(v * v for v in r)) for r in rows]
    d = [[1.0 - sum(a * b for a, b in zip(rows[i], rows[j])) / (norm[i] * norm[j]) for j in range(len(rows))]
         for i in range(len(rows))]
    n = len(rows)
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < count:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][j] for j in chosen), -i)))
    return chosen


@pytest.mark.parametrize("n,ratio", [(24, 0.25), (576, 0.098), (50, 0.5), (7, 0.3)])
def test_the_selection_is_the_authors(n, ratio):
    torch.manual_seed(n)
    x = torch.randn(n, 16)
    want = authors_selection(x, ratio)
    n_keep = n - DivPrune(DivPruneConfig()).keep_removal(n, ratio)
    assert n_keep == len(want)  # round(ratio n), as their count
    assert max_min_diverse(x.unsqueeze(0), n_keep)[0].tolist() == want.tolist()


def test_the_selection_follows_the_papers_definition_batched():
    torch.manual_seed(1)
    x = torch.randn(3, 20, 6)
    got = max_min_diverse(x, 8)
    for b in range(3):
        assert got[b].tolist() == definition_selection(x[b], 8)


def test_duplicates_are_never_chosen_twice():
    """Identical tokens: once one is kept its twins are at distance 0 from the kept set, and a
    kept token is never picked again (the kept set is n_keep distinct tokens)."""
    x = torch.randn(4, 8).repeat(3, 1)  # 12 tokens, each value three times
    kept = max_min_diverse(x.unsqueeze(0), 6)[0]
    assert len(set(kept.tolist())) == 6
    assert len({tuple(x[i].tolist()) for i in kept[:4].tolist()}) == 4  # the 4 distinct values first


def test_default_budget_is_the_authors_ratio():
    assert DivPruneConfig().budget == ("keep", 0.098)
    assert DivPrune(DivPruneConfig()).keep_removal(576, 0.098) == 576 - 56


def test_outside_a_vision_language_model_it_is_refused():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(TypeError, match="'divprune' selects the image tokens a vision-language model's language"):
        tome_plus.patch(model, "divprune", keep=0.5)


@pytest.fixture
def vlm():
    pytest.importorskip("transformers")
    import vlm_models as V
    model = V.FACTORIES["llava_next"](text_config={"num_hidden_layers": 4})
    model.generation_config.eos_token_id = None
    return V, model, V.INPUTS["llava_next"](model, rows=([2, "image", 3, "image", 1],))


def test_at_the_features_site_the_llm_runs_on_the_rows_it_keeps(vlm):
    """Each image's features (newlines aside) reduced to `tokens` by the max-min selection, kept in
    input order at their own positions: the logits are the unpatched language model's on those rows."""
    from test_vlm_features import last_logits, llm_inputs
    V, model, inputs = vlm
    embeds, positions = llm_inputs(model, inputs)
    ids = inputs["input_ids"][0]
    newline = (embeds == model.model.image_newline).all(-1)
    keep = (ids != V.IMAGE_ID) | newline
    visual = (ids == V.IMAGE_ID).long()
    starts = ((visual.diff(prepend=visual.new_zeros(1)) == 1).nonzero()[:, 0]).tolist()
    for start in starts:  # each image's run
        end = start
        while end < len(ids) and ids[end] == V.IMAGE_ID:
            end += 1
        rows = torch.tensor([p for p in range(start, end) if not newline[p]])
        keep[rows[max_min_diverse(embeds[rows].unsqueeze(0), 4)[0]]] = True
    assert tome_plus.patch(model, "divprune", tokens=4) is model  # the default site: the features
    assert tome_plus.inspect(model).method == "divprune"
    with torch.no_grad():
        got = model(**inputs).logits[:, -1]
    kept = torch.nonzero(keep)[:, 0]
    torch.testing.assert_close(got, last_logits(model, embeds[kept], positions[..., kept]), rtol=1e-4, atol=1e-4)
    report = tome_plus.inspect(model).llm_positions[0][0]
    assert report[report >= 0].tolist() == kept.tolist()


def test_sites_and_options_are_checked(vlm):
    from test_hf import llava
    llava_15 = llava()
    assert tome_plus.inspect(tome_plus.patch(llava_15, "divprune", keep=0.5)).method == "divprune"  # at the features
    with pytest.raises(ValueError, match="site='tower' runs .*not 'divprune'"):
        tome_plus.patch(llava_15, "divprune", site="tower", keep=0.5)
    V, model, inputs = vlm
    with pytest.raises(TypeError, match="unknown option"):
        tome_plus.patch(model, "divprune", keep=0.5, speed=2)
    with pytest.raises(ValueError, match="keep"):
        tome_plus.patch(model, "divprune", keep=1.5)


def test_rounding_between_duplicates_does_not_decide():
    """Duplicates whose features differ only by rounding (two backends, two dtypes) are kept alike:
    the lower index of each pair, whatever the noise."""
    torch.manual_seed(3)
    base = torch.randn(10, 16).repeat(2, 1)  # token i and i + 10 are twins
    picks = {tuple(max_min_diverse((base + 1e-5 * torch.randn_like(base) * base.abs()).unsqueeze(0), 6)[0].tolist())
             for _ in range(5)}
    assert len(picks) == 1 and all(i < 10 for i in next(iter(picks)))
