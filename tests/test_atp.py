"""ATP inside the LLM of a tiny random LLaVA (Llama text model, 4 layers)."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers", reason='ATP tests need transformers: pip install -e ".[hf]"')

import tome_plus  # noqa: E402
from tome_plus.llm.context import collecting  # noqa: E402
from tome_plus.llm.segments import instruction_after_image  # noqa: E402
from tome_plus.methods.atp import module_fraction, percentile, scores, spatial_score  # noqa: E402

from test_hf import IMAGE_ID, N_IMAGE, greedy, llava, prompts  # noqa: E402


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def batches(n=4, seed=0):
    out = []
    for s in range(n):
        torch.manual_seed(seed + s)
        ids, mask = prompts((3, 6), (2, 7))
        ids = torch.where(ids == IMAGE_ID, ids, torch.randint(2, 150, ids.shape))
        labels = torch.where((ids == IMAGE_ID) | (mask == 0), -100, ids)
        out.append(dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 64, 64), labels=labels))
    return out


def thresholds(model, bias_r, bias_s=20.0, spread=0.0):
    """Make the modules decide by their thresholds: theta = sigmoid(bias (+ a per-instance spread))."""
    mods = tome_plus.atp.modules(model)
    torch.manual_seed(3)
    for module in mods.modules_:
        torch.nn.init.normal_(module.head_r.weight, std=spread)
        torch.nn.init.constant_(module.head_r.bias, bias_r)
        torch.nn.init.constant_(module.head_s.bias, bias_s)
    mods.trained.fill_(True)


# -------------------------------------------------------------------------------- the pieces

def test_scores_equal_a_loop_reference():
    torch.manual_seed(0)
    b, h, n = 2, 3, 9
    probs = torch.rand(b, h, n, n).tril()
    probs = probs / probs.sum(-1, keepdim=True)
    visual = torch.zeros(b, n, dtype=torch.bool)
    visual[:, 2:6] = True
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 0] = False
    instruction = instruction_after_image(visual, valid)
    got = scores(probs, visual, instruction, valid)
    for r in range(b):
        for j in range(n):
            if not visual[r, j]:
                assert got[r, j] == 0
                continue
            mean = probs[r].mean(0)
            window = lambda i: max(sum(bool(valid[r, k]) for k in range(i + 1)), 1)  # keys query i sees
            sv = [mean[i, j] * window(i) for i in range(n) if visual[r, i] and valid[r, i] and i >= j]
            st = [mean[i, j] * window(i) for i in range(n) if instruction[r, i]]
            s_self = sum(sv) / len(sv)
            expected = (s_self + sum(st) / len(st)) / 2 if st else s_self
            assert math.isclose(float(got[r, j]), float(expected), rel_tol=1e-5)


def test_uniform_causal_attention_scores_every_position_alike():
    n = 12
    probs = torch.ones(n, n).tril()
    probs = (probs / probs.sum(-1, keepdim=True)).expand(1, 2, n, n)
    visual = torch.zeros(1, n, dtype=torch.bool)
    visual[:, 2:9] = True
    valid = torch.ones(1, n, dtype=torch.bool)
    got = scores(probs, visual, instruction_after_image(visual, valid), valid)
    torch.testing.assert_close(got[visual], torch.ones(7))


def test_spatial_score_is_a_nested_uniform_grid():
    grid = spatial_score((6, 8), torch.device("cpu")).view(6, 8)
    for y in range(6):
        for x in range(8):
            s = 8 if y == x == 0 else max(2 ** k for k in range(4) if y % 2 ** k == 0 and x % 2 ** k == 0)
            assert grid[y, x] == s / 8
    # any threshold keeps a uniform grid: every 2nd row and column above 1/8, every 4th above 1/4
    assert torch.equal((grid > 1 / 8).nonzero(), torch.cartesian_prod(torch.arange(0, 6, 2), torch.arange(0, 8, 2)))


def test_percentile_ranks_visual_tokens():
    score = torch.tensor([[0.0, 3.0, 1.0, 2.0, 5.0]])
    visual = torch.tensor([[False, True, True, True, False]])
    pct = percentile(score, visual)
    assert torch.allclose(pct[0, 1:4], torch.tensor([1.0, 1 / 3, 2 / 3])) and pct[0, 0].isnan() and pct[0, 4].isnan()


@pytest.mark.parametrize("keep,layers,depth", [(0.25, [4, 14, 24], 32), (0.5, [0, 2], 4), (0.7, [1], 4)])
def test_module_fraction_meets_the_layer_average(keep, layers, depth):
    f = module_fraction(keep, layers, depth)
    per_layer, kept = [], 1.0
    for layer in range(depth):
        per_layer.append(kept)
        if layer in layers:
            kept *= f
    assert math.isclose(sum(per_layer) / depth, keep, abs_tol=1e-6)


# ------------------------------------------------------------------------------- inference

def test_zero_shot_keeps_the_fraction_and_generates_consistently(pixels):
    model = llava()
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    ids, mask = prompts((3, 5), (1, 2))
    cached = greedy(model, ids, mask, pixels)
    info = tome_plus.inspect(model)
    f = module_fraction(0.5, [0, 2], 4)
    first = math.ceil(N_IMAGE * f)
    assert info.llm_kept.tolist() == [[first] * 2, [math.ceil(first * f)] * 2]
    assert torch.equal(cached, greedy(model, ids, mask, pixels, use_cache=False))


def test_forward_and_generate_keep_the_same_tokens(pixels):
    """generate encodes the images before it calls forward without pixel_values: the SAP grid must
    come from what both paths have, so both keep the same tokens of the same prompt."""
    model = llava()
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    # rows of one length: a padded row's position ids differ between HF's forward (arange) and
    # generate (from the mask) before any pruning
    ids, mask = prompts((3, 5), (3, 5))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    forward = tome_plus.inspect(model)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=1, do_sample=False)
    generated = tome_plus.inspect(model)
    assert torch.equal(forward.llm_kept, generated.llm_kept)
    for a, b in zip(forward.llm_positions, generated.llm_positions):
        assert torch.equal(a, b)


def check_keeping_everything(pixels, patch, sites):
    """`patch(model)` makes an LLM-side method keep every token: the LLaVA then gives the unpatched
    greedy tokens and (to float tolerance) logits, every image token is kept at each of its `sites`
    pruning sites, and unpatch restores the tokens. Returns the unpatched model, its prompt and
    its reference logits."""
    model = llava()
    ids, mask = prompts((3, 5), (1, 2))
    ref = greedy(model, ids, mask, pixels)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    patch(model)
    assert torch.equal(greedy(model, ids, mask, pixels), ref)
    assert torch.equal(tome_plus.inspect(model).llm_kept, torch.full((sites, 2), N_IMAGE))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    tome_plus.unpatch(model)
    assert torch.equal(greedy(model, ids, mask, pixels), ref)
    return model, ids, mask, ref_logits


def test_keeping_everything_gives_the_unpatched_tokens(pixels):
    def patch(model):
        tome_plus.patch(model, "atp", keep=0.25, layers=[0, 2])
        thresholds(model, bias_r=-20.0, bias_s=-20.0)
    check_keeping_everything(pixels, patch, sites=2)


def test_image_in_a_later_forward_with_the_cache(pixels):
    """A text-only first turn, then an image with the cache: the modules score the new tokens."""
    model = llava()
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    text = torch.tensor([[1, 20, 21, 22]] * 2)
    with torch.no_grad():
        first = model(input_ids=text, attention_mask=torch.ones_like(text), use_cache=True)
        ids, _ = prompts((0, 3), (0, 3))
        ids = ids[:, 1:]
        mask = torch.ones(2, text.shape[1] + ids.shape[1], dtype=torch.long)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache=first.cache)
    assert out.logits.shape[1] == ids.shape[1]
    assert bool((tome_plus.inspect(model).llm_kept < N_IMAGE).all())


def test_per_instance_counts_and_survivor_positions(pixels):
    model = llava()
    tome_plus.patch(model, "atp", keep=0.25, layers=[1])
    thresholds(model, bias_r=0.0, spread=0.5)
    ids, mask = prompts((3, 5), (1, 2))
    images = torch.stack([pixels[0], -pixels[0]])
    cached = greedy(model, ids, mask, images)
    info = tome_plus.inspect(model)
    counts = info.llm_kept[0]
    assert counts[0] != counts[1] and bool((counts > 0).all()) and bool((counts < N_IMAGE).all())
    assert torch.equal(cached, greedy(model, ids, mask, images, use_cache=False))
    with torch.no_grad():  # a plain forward: HF's position ids are the token indices
        model(input_ids=ids, attention_mask=mask, pixel_values=images)
    positions = tome_plus.inspect(model).llm_positions[0]
    for row in range(2):
        kept = positions[row][positions[row] >= 0]
        assert bool((kept[1:] > kept[:-1]).all())  # order kept
        image = (ids[row] == IMAGE_ID).nonzero().flatten()
        text = ((ids[row] != IMAGE_ID) & (mask[row] == 1)).nonzero().flatten()
        assert set(text.tolist()) <= set(kept.tolist())  # every text token survives, at its own position
        assert len(set(kept.tolist()) & set(image.tolist())) == int(counts[row])  # survivors keep their ids
        assert len(kept) == len(text) + int(counts[row])


def test_atp_with_a_tower_method(pixels):
    model = llava()
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2], tower={"method": "tome", "r": 6})
    ids, mask = prompts((3, 5), (1, 2))
    cached = greedy(model, ids, mask, pixels)
    info = tome_plus.inspect(model)
    n_image = int(info.image_tokens[0])
    assert n_image < N_IMAGE and info.tokens[0] == 65 - 6  # the tower merged
    assert info.llm_kept[0, 0] == math.ceil(n_image * module_fraction(0.5, [0, 2], 4))  # ATP pruned further
    assert torch.equal(cached, greedy(model, ids, mask, pixels, use_cache=False))
    tome_plus.unpatch(model)
    assert type(model.model.vision_tower.encoder.layers[0]).__name__ == "CLIPEncoderLayer"


def test_state_dict_and_unpatch(pixels):
    model = llava()
    keys = set(model.state_dict())
    ids, mask = prompts((3, 5), (1, 2))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    tome_plus.patch(model, "atp", keep=0.5)
    assert set(model.state_dict()) == keys  # the modules live on the patch record (tests/test_hf_checkpoint.py)
    assert len(list(tome_plus.atp.modules(model).parameters())) > 0
    tome_plus.unpatch(model)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)


def test_errors(pixels, tmp_path):
    model = llava()
    with pytest.raises(ValueError, match="after decoder layers 0..2"):
        tome_plus.patch(model, "atp", layers=[3])
    with pytest.raises(ValueError, match="one keep fraction"):
        tome_plus.patch(model, "atp", r=4)
    with pytest.raises(ValueError, match="tower must be a dict"):
        tome_plus.patch(model, "atp", tower="tome")
    with pytest.warns(UserWarning, match="prune every visual token"):  # layers 0-1 of 4 keep all: >= 0.5
        tome_plus.patch(model, "atp", keep=0.4, layers=[1])
    tome_plus.patch(model, "atp", keep=0.5)
    ids, mask = prompts((3, 5), (1, 2))
    tome_plus.atp.save(model, str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="patch with layers"):
        tome_plus.patch(llava(), "atp", keep=0.7, layers=[1], weights=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="train_llm=True with a checkpoint"):
        tome_plus.atp.train(model, batches(1), steps=1, train_llm=True, checkpoint=str(tmp_path / "c.pt"))
    from conftest import make
    with pytest.raises(TypeError):
        tome_plus.patch(make("vit_tiny_patch16_224"), "atp", keep=0.5)


# ------------------------------------------------------------------------------- training

def test_training_moves_toward_the_budget_and_lowers_the_loss(tmp_path, pixels):
    model = llava()
    tome_plus.patch(model, "atp", keep=0.3, layers=[0, 2])
    data = batches()
    history = tome_plus.atp.train(model, data, steps=37, lr=1e-3, progress=False, checkpoint=str(tmp_path / "a.pt"),
                                  save_every=10)
    first, last = history[0], history[-1]  # both on batch 0 (4 batches, cycled)
    assert abs(last["kept"] - 0.3) < abs(first["kept"] - 0.3)
    assert last["loss"] < first["loss"]
    trained = tome_plus.atp.modules(model)
    assert bool(trained.trained)
    init = llava()
    tome_plus.patch(init, "atp", keep=0.3, layers=[0, 2])
    for before, after in zip(tome_plus.atp.modules(init).modules_, trained.modules_):
        assert not torch.equal(before.head_r.bias, after.head_r.bias)
        assert not torch.equal(before.head_s.weight, after.head_s.weight)  # the spatial head learns too
    # what inference keeps, averaged over the 4 layers, is near the budget the training aimed at
    with torch.no_grad():
        model(**{k: v for k, v in data[0].items() if k != "labels"})
    kept = tome_plus.inspect(model).llm_kept.float() / N_IMAGE  # [modules, B]
    layer_average = (1 + 2 * kept[0] + kept[1]) / 4  # layer 0 sees all; 1-2 after module 0; 3 after 1
    assert bool(((layer_average - 0.3).abs() < 0.1).all()), layer_average
    # the saved weights load into a fresh model and decide the same
    ids, mask = prompts((3, 5), (1, 2))
    out = greedy(model, ids, mask, pixels)
    other = llava()
    tome_plus.patch(other, "atp", keep=0.3, layers=[0, 2], weights=str(tmp_path / "a.pt"))
    assert torch.equal(greedy(other, ids, mask, pixels), out)
    assert torch.equal(tome_plus.inspect(other).llm_kept, tome_plus.inspect(model).llm_kept)


def test_training_resumes_from_a_checkpoint(tmp_path):
    path = str(tmp_path / "a.pt")
    straight = llava()
    tome_plus.patch(straight, "atp", keep=0.3, layers=[0, 2])
    tome_plus.atp.train(straight, batches(), steps=4, progress=False)
    split = llava()
    tome_plus.patch(split, "atp", keep=0.3, layers=[0, 2])
    tome_plus.atp.train(split, batches(), steps=2, progress=False, checkpoint=path)
    again = llava()
    tome_plus.patch(again, "atp", keep=0.3, layers=[0, 2])
    history = tome_plus.atp.train(again, batches()[2:] + batches()[:2], steps=4, progress=False, checkpoint=path,
                                  resume=True)
    assert [h["step"] for h in history] == [3, 4]
    for a, b in zip(tome_plus.atp.modules(again).state_dict().values(),
                    tome_plus.atp.modules(straight).state_dict().values()):
        torch.testing.assert_close(a, b)
    # the checkpoint records its keep target; resuming it for another is refused
    other = llava()
    tome_plus.patch(other, "atp", keep=0.5, layers=[0, 2])
    with pytest.raises(ValueError, match="trained for keep=0.3, not keep=0.5"):
        tome_plus.atp.train(other, batches(), steps=6, progress=False, checkpoint=path, resume=True)


def _rank(rank, world, init, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = llava()
        torch.manual_seed(100 + rank)  # different module init per rank: training must broadcast rank 0's
        tome_plus.patch(model, "atp", keep=0.3, layers=[0, 2])
        for p in tome_plus.atp.modules(model).parameters():
            torch.nn.init.normal_(p, std=0.01)
        if rank == 0:
            torch.save(tome_plus.atp.modules(model).state_dict(), os.path.join(out, "init0.pt"))
        tome_plus.atp.train(model, batches(2, seed=10 * rank), steps=3, progress=False)
        torch.save(tome_plus.atp.modules(model).state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_training_keeps_ranks_equal(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = torch.load(tmp_path / "init0.pt")
    assert not all(torch.equal(a[k], init[k]) for k in a if a[k].is_floating_point())  # trained, from rank 0's start


def run_atp_cli(argv, capsys):
    """Exit status and stderr of `tome-plus ARGV` (which must exit)."""
    from tome_plus.tools import cli
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


def test_atp_train_command(tmp_path, capsys):
    from tome_plus.tools import cli
    out = str(tmp_path / "w" / "atp.pt")
    args = ["atp-train", "--hf-shape", "llava-tiny", "--data", "synthetic", "--layers", "0", "--keep", "0.7",
            "--batch-size", "2", "--no-progress", "--out", out]
    status, err = run_atp_cli(args + ["--steps", "2", "--resume"], capsys)  # nothing to resume yet
    assert status == 2 and "--resume: there is no checkpoint at --out" in err and not os.path.exists(out)
    assert cli.main(args + ["--steps", "2"]) == 0
    saved = torch.load(out, weights_only=False)
    assert saved["step"] == 2 and saved["keep"] == 0.7
    assert cli.main(args + ["--steps", "3", "--resume"]) == 0
    assert torch.load(out, weights_only=False)["step"] == 3
    assert "visual tokens kept" in capsys.readouterr().out
    # the checkpoint still loads the way the docs say (the recorded settings are plain data)
    model = llava()
    tome_plus.patch(model, "atp", keep=0.7, layers=[0], weights=out)
    before = open(out, "rb").read()
    refused = [  # one line, exit 2, the checkpoint untouched
        (args + ["--steps", "4"], "already exists; pass --resume to continue it or --overwrite to replace it"),
        ([*args[:8], "0.5", *args[9:], "--steps", "4", "--resume"],
         f"--resume: {out} was trained for --keep 0.7, not 0.5"),
        ([*args[:6], "1", *args[7:], "--steps", "4", "--resume"], "holds modules after layers [0], not --layers [1]"),
        (args + ["--steps", "4", "--resume", "--overwrite"], "not allowed with argument"),
        (["atp-train", "--hf-shape", "llava-tiny", "--data", "train.jsonl", "--out", out], "needs --model"),
        (args + ["--steps", "4", "--keep", "2"], "--keep must lie in (0, 1], got 2.0"),
    ]
    for argv, message in refused:
        status, err = run_atp_cli(argv, capsys)
        assert (status, err.count("\n")) == (2, 1) and message in err, (argv, err)
        assert open(out, "rb").read() == before
    # modules of another model shape (here: widened in the file): one line, not a state_dict dump
    other = str(tmp_path / "other.pt")
    wide = dict(saved, modules={k: v.repeat(2, *[1] * (v.dim() - 1)) if v.dim() else v
                                for k, v in saved["modules"].items()})
    torch.save(wide, other)
    status, err = run_atp_cli([*args[:-1], other, "--steps", "4", "--resume"], capsys)
    assert (status, err.count("\n")) == (2, 1), err
    assert f"--resume: {other} holds ATP modules of another model shape than --hf-shape llava-tiny" in err
    assert cli.main(args + ["--steps", "1", "--overwrite"]) == 0
    assert torch.load(out, weights_only=False)["step"] == 1


def test_atp_train_ctrl_c_says_where_it_stopped_and_resumes(tmp_path, capsys, monkeypatch):
    from tome_plus.tools import atp_train, cli
    real = atp_train.synthetic_batches

    def stop_at_step_4(*a, **k):  # Ctrl-C while step 4 asks for its batch
        for i, batch in enumerate(real(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(atp_train, "synthetic_batches", stop_at_step_4)
    out = str(tmp_path / "atp.pt")
    args = ["atp-train", "--hf-shape", "llava-tiny", "--data", "synthetic", "--layers", "0", "--keep", "0.7",
            "--batch-size", "2", "--no-progress", "--out", out, "--steps", "6", "--save-every", "2"]
    status, err = run_atp_cli(args, capsys)
    assert status == 130
    assert err == (f"tome-plus atp-train: interrupted: stopped after step 3 of 6; {out} holds step 2: run the same "
                   "command with --resume to continue from there\n")
    saved = torch.load(out, weights_only=False)
    assert saved["step"] == 2 and os.listdir(tmp_path) == ["atp.pt"]
    monkeypatch.undo()
    assert cli.main(args + ["--resume"]) == 0
    assert torch.load(out, weights_only=False)["step"] == 6


def _with_attention(impl):
    model = llava()
    model.set_attn_implementation(impl)
    return model


def flash_standin(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash attention's semantics, written out: a 2-D padding mask (or None) unpads each row's
    keys and its last queries, and in a causal module a query attends from the right over the
    real ones (the vision tower attends over all)."""
    batch, _, n, _ = query.shape
    keys = key.shape[2]
    valid = torch.ones(batch, keys, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = torch.zeros(batch, n, query.shape[1], query.shape[3], dtype=query.dtype)
    groups = query.shape[1] // key.shape[1]
    for b in range(batch):
        k_rows = valid[b].nonzero().squeeze(1)
        q_rows = valid[b, keys - n:].nonzero().squeeze(1)
        q, k = query[b][:, q_rows], key[b][:, k_rows].repeat_interleave(groups, 0)
        v = value[b][:, k_rows].repeat_interleave(groups, 0)
        causal = torch.ones(len(q_rows), len(k_rows), dtype=torch.bool)
        if getattr(module, "is_causal", True):
            causal = causal.tril(len(k_rows) - len(q_rows))
        probs = ((q @ k.transpose(-2, -1)) * scaling).masked_fill(~causal, float("-inf")).softmax(-1)
        out[b, q_rows] = (probs @ v).transpose(0, 1)
    return out, None


@pytest.fixture(scope="module")
def fa2_standin():
    """flash_attention_2 as a CPU can run it: its mask form (a 2-D padding mask) and its
    attention's semantics (`flash_standin`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register("fa2_standin", flash_standin)
    AttentionMaskInterface.register("fa2_standin", AttentionMaskInterface._global_mapping["flash_attention_2"])
    return "fa2_standin"


def test_flash_standin_is_flash_attention(fa2_standin):
    """The stand-in gives the unpatched sdpa model's logits and tokens on a left-padded batch."""
    ids, mask = prompts((3, 5), (1, 2))
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    model, ref = _with_attention(fa2_standin), llava()
    with torch.no_grad():
        logits, ref_logits = (m(input_ids=ids, attention_mask=mask, pixel_values=images).logits for m in (model, ref))
    real = mask.bool()  # flash attention leaves padding rows zero
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, ids, mask, images), greedy(ref, ids, mask, images))


@pytest.mark.parametrize("impl", ["eager", "flex_attention", "fa2"])
def test_every_attention_backend_prunes_alike(impl, fa2_standin, pixels):
    """ATP's layers run SDPA with masks of their own; HF's mask is used only in its 4-D form, so a
    padded batch gives the sdpa model's tokens under eager, flex (BlockMask) and flash attention's
    2-D mask alike, with and without the cache."""
    ids, mask = prompts((3, 5), (1, 2))
    ref_model = llava()
    tome_plus.patch(ref_model, "atp", keep=0.5, layers=[0, 2])
    ref = greedy(ref_model, ids, mask, pixels)
    model = _with_attention(fa2_standin if impl == "fa2" else impl)
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    assert torch.equal(greedy(model, ids, mask, pixels), ref)
    assert torch.equal(greedy(model, ids, mask, pixels, use_cache=False), ref)
    assert torch.equal(tome_plus.inspect(model).llm_kept, tome_plus.inspect(ref_model).llm_kept)


def test_llm_hidden_states_as_unpatched(pixels):
    """HF's decoder layers run as they are: keeping everything, the LLM's hidden states equal the
    unpatched ones; pruning, each is [B, L, D] at the input's positions, equal to the unpatched up
    to the first module's layer, zeros at pruned tokens after it (attentions: test_hf_generate.py)."""
    ids, mask = prompts((3, 5), (1, 2))
    model = llava()
    args = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
    with torch.no_grad():
        ref = model(**args).hidden_states
    tome_plus.patch(model, "atp", keep=0.25, layers=[0, 2])
    thresholds(model, bias_r=-20.0, bias_s=-20.0)  # keeps every token
    with torch.no_grad():
        states = model(**args).hidden_states
    assert len(states) == len(ref) == 5
    for got, want in zip(states, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tome_plus.unpatch(model)
    tome_plus.patch(model, "atp", keep=0.5, layers=[0, 2])
    with torch.no_grad():
        out = model(**args)
    states, kept = out.hidden_states, tome_plus.inspect(model).llm_kept
    assert [tuple(t.shape) for t in states] == [tuple(t.shape) for t in ref]
    torch.testing.assert_close(states[1], ref[1], rtol=1e-5, atol=1e-5)  # layer 0's output: nothing pruned yet
    pruned = (states[2] == 0).all(-1) & (ids == IMAGE_ID)  # zeros from the layer after module 0 on
    assert torch.equal(pruned.sum(1), (ids == IMAGE_ID).sum(1) - kept[0])
    assert bool((states[4] == 0).all(-1)[pruned].all())


def test_gradient_checkpointing_reaches_every_layer_and_changes_no_gradient():
    """ATP training (soft masks) with HF's gradient checkpointing: every decoder layer is
    checkpointed, the loss and the gradients of the modules and the LLM equal those without it."""
    data = batches(1)[0]
    results = []
    for checkpointing in (False, True):
        model = llava()
        tome_plus.patch(model, "atp", keep=0.3, layers=[0, 2])
        thresholds(model, bias_r=0.0, spread=0.5)
        model.train()
        calls = []
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            for layer in model.model.language_model.layers:
                inner = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
        with collecting() as collected:
            loss = model(**data).loss + collected[0].kept_fraction.nanmean()
        loss.backward()
        named = [("atp." + name, p) for name, p in tome_plus.atp.modules(model).named_parameters()]
        named += list(model.named_parameters())
        grads = {name: p.grad.clone() for name, p in named
                 if p.grad is not None and (name.startswith("atp.") or "language_model" in name)}
        results.append((loss.detach(), grads, len(calls)))
    (loss0, grads0, _), (loss1, grads1, n_calls) = results
    assert n_calls == 4  # the 4 decoder layers
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and any(name.startswith("atp.") for name in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6)


def test_soft_masks_refused_under_flash_attention(fa2_standin):
    """Training's soft masks are a float bias on the keys: a backend with a 2-D mask is refused by name."""
    model = _with_attention(fa2_standin)
    tome_plus.patch(model, "atp", keep=0.3, layers=[0, 2])
    with pytest.raises(ValueError, match="soft masks.*sdpa"), collecting():
        model(**batches(1)[0])
