"""lmms-eval runs a patched model through tome_plus's registered `tome_plus` model: a tiny random
LLaVA saved with its processor, and a tiny local generation task made here; lmms-eval's own
`qwen3_vl`, `internvl_hf`, `gemma3` and `qwen3_5` models as `base`, on a tiny Qwen3-VL, InternVL,
Gemma 3 and Qwen3.5 saved alike.

(lmms-eval 0.7.3's llava_hf cannot run multiple-choice tasks on transformers 5, unpatched too: its
log-likelihood encodes the context's `<image>` without the image, which the processor refuses.
The log-likelihood path of a patched model is checked directly below.)"""
import json
import os
import sys
from functools import partial

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lmms_eval")
pytest.importorskip("decord")  # lmms-eval's llava_hf model imports it

import tome_plus  # noqa: E402
import vlm_models  # noqa: E402
from test_hf import IMAGE_ID, llava  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")
sys.path.insert(0, EXAMPLE)
import lmms_eval_offline as example  # noqa: E402  (the offline example builds the model and task)

assert example.IMAGE_ID == IMAGE_ID  # the example's vocabulary and placeholder fit test_hf's model
assert (example.VIDEO_ID, example.VISION_START, example.VISION_END, example.NEWLINES) == (
    vlm_models.VIDEO_ID, vlm_models.VISION_START, vlm_models.VISION_END, vlm_models.NEWLINES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    example.save_model(str(root / "model"), llava())
    (root / "tasks").mkdir()
    example.save_task(str(root / "tasks"))
    return root


def run(tiny, model, model_args, tasks=("tiny_vqa",), force_simple=True):
    """lmms-eval's own entry point; the simple kind by default (the chat kind generates only)."""
    results = example.evaluate(str(tiny), model, model_args, tasks, force_simple)
    samples = {task: [(s["doc_id"], s["resps"]) for s in results["samples"][task]] for task in tasks}
    return results["results"], samples


@pytest.fixture(scope="module")
def reference(tiny):
    """lmms-eval's own `llava_hf` on the tiny model: {force_simple: (scores, samples)}."""
    return {simple: run(tiny, "llava_hf", "", force_simple=simple) for simple in (True, False)}


def test_the_offline_example_runs_as_written(tmp_path, capsys):
    """examples/lmms_eval_offline.py: its own tiny model and task, unpatched and patched."""
    scores = example.main(["--out", str(tmp_path), "--model-args", "method=tome,tokens=16"])
    unpatched, patched = scores.values()
    assert set(unpatched) == set(patched) and "words,none" in patched
    assert "lmms-eval --model tome_plus" in capsys.readouterr().out


def test_lmms_eval_finds_the_model_by_its_entry_point():
    from lmms_eval.models import get_model
    assert get_model("tome_plus").__name__ == "TomePlusChat"  # lmms-eval prefers the chat kind
    assert get_model("tome_plus", force_simple=True).__name__ == "TomePlus"


@pytest.mark.parametrize("model_args", ["method=tome,r=0", "method=fastv,keep=1.0,k=1",
                                        "method=tome,site=features,keep=1.0", "method=visionzip,tokens=64",
                                        'method=pyramiddrop,keep=1.0,layers="[1, 2]"'])
def test_zero_budget_gives_the_harness_numbers_of_the_unpatched_model(tiny, reference, model_args):
    """Every sample's generated text and every metric equal lmms-eval's own llava_hf model's, for
    the tower, llm and features sites, as the simple and as the chat kind."""
    ref_scores, ref_samples = reference[True]
    scores, samples = run(tiny, "tome_plus", model_args)
    assert samples == ref_samples
    for task in ("tiny_vqa",):
        numbers = {k: v for k, v in scores[task].items() if isinstance(v, float)}
        assert numbers and numbers == {k: v for k, v in ref_scores[task].items() if isinstance(v, float)}
    # lmms-eval's default, the chat kind, on the generation task
    ref_scores, ref_samples = reference[False]
    scores, samples = run(tiny, "tome_plus", model_args, tasks=("tiny_vqa",), force_simple=False)
    assert samples == ref_samples and scores["tiny_vqa"]["words,none"] == ref_scores["tiny_vqa"]["words,none"]


def test_a_reducing_patch_runs_and_logs_what_each_prompt_kept(tiny, tmp_path):
    """tokens=16 in the tower: 16 of the 64 image tokens reach the LLM in every prompt (logged per
    prompt after the patch record); a log-likelihood's logits are put back
    at the prompt's positions (as a harness slices them), so they agree with the model's loss."""
    log = tmp_path / "kept.jsonl"
    scores, samples = run(tiny, "tome_plus", f"method=tome,tokens=16,log={log}")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["method"] == "tome" and lines[0]["site"] == "tower" and lines[0]["options"] == {"tokens": 16}
    assert len(lines) > 1 and all(entry["image_tokens"] == [16] for entry in lines[1:])
    assert "tiny_vqa" in scores
    # a continuation's log-likelihood as llava_hf computes it: the loss, and logits sliced by the prompt
    from lmms_eval.models import get_model
    wrapped = get_model("tome_plus")(pretrained=str(tiny / "model"), device="cpu", device_map="cpu", method="tome",
                                     tokens=16)
    model = wrapped.inner.model
    processor = wrapped.inner._image_processor
    from PIL import Image
    image = Image.new("RGB", (40, 48), (120, 30, 200))
    full = processor(text="USER: <image>\nwhat is this ? ASSISTANT: cat", images=[image], return_tensors="pt")
    n_context = full["input_ids"].shape[1] - 1  # the continuation is one word
    labels = full["input_ids"].clone()
    labels[:, :n_context] = -100
    with torch.no_grad():
        out = model(**full, labels=labels)
    assert out.logits.shape[1] == full["input_ids"].shape[1]  # at the caller's positions
    logits = out.logits[0, n_context - 1:-1]
    target = full["input_ids"][0, n_context:]
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, target), out.loss, rtol=1e-5, atol=1e-5)


def test_options_reach_the_method_and_unknown_ones_the_base(tiny):
    from lmms_eval.models import get_model
    cls = get_model("tome_plus")
    wrapped = cls(pretrained=str(tiny / "model"), device="cpu", device_map="cpu", method="atp", keep=0.5,
                  layers="[0, 2]")
    info = tome_plus.backends.base.get_info(wrapped.inner.model)
    assert info.method == "atp" and list(info.config.layers) == [0, 2] and info.parts.site == "llm"
    # through lmms-eval's own `key=value,...` parser, a list arrives quoted
    from lmms_eval.api.model import lmms
    from lmms_eval.utils import simple_parse_args_string
    parsed = simple_parse_args_string(f'pretrained={tiny / "model"},device_map=cpu,method=atp,keep=0.5,layers="[0, 2]"')
    wrapped = cls(device="cpu", **parsed)
    assert isinstance(wrapped, lmms)
    assert list(tome_plus.backends.base.get_info(wrapped.inner.model).config.layers) == [0, 2]
    with pytest.raises(AssertionError, match="Unexpected kwargs"):  # llava_hf refuses what nobody takes
        cls(pretrained=str(tiny / "model"), device="cpu", device_map="cpu", method="tome", nonsense=1)


def test_sweep_with_lmms_eval_scores_and_bench_hf_timing(tiny, reference, tmp_path):
    """`tome-plus sweep --source lmms-eval`: each point's score is the harness's, its speed
    `bench --hf`'s; keeping everything scores as the unpatched model and costs the same FLOPs."""
    from tome_plus.tools import sweep
    report = sweep.main(["--source", "lmms-eval", "--vlm", str(tiny / "model"), "--tasks", "tiny_vqa",
                         "--include-path", str(tiny / "tasks"), "--metric", "words", "--hf-shape", "llava-tiny",
                         "--methods", "tome", "--keep", "1.0,0.5", "--out", str(tmp_path), "--bench-batch", "1",
                         "--warmup", "0", "--runs", "1", "--no-progress", "--device", "cpu", "--batch-size", "1"])
    base, everything, half = report["points"]
    ref, _ = reference[False]  # lmms-eval's default kind, as the sweep runs it
    assert base["accuracy"] == everything["accuracy"] == ref["tiny_vqa"]["words,none"]
    assert everything["flops_ratio"] == 1.0 and half["flops_ratio"] < 1.0
    assert (tmp_path / "sweep.png").exists()


# ------------------------------------------------------------ Qwen3-VL, InternVL, Gemma 3, Qwen3.5 as `base`

# larger initial weights than the default (std 0.02): with those the tiny models' greedy answers
# depend on the image, so a changed visual token changes the answer (Gemma 3 and Qwen3.5 give every
# image the same answer at 0.2, not at 0.1)
LOUD = dict(initializer_range=0.2, text_config={"initializer_range": 0.2}, vision_config={"initializer_range": 0.2})
MILD = dict(initializer_range=0.1, text_config={"initializer_range": 0.1}, vision_config={"initializer_range": 0.1})
# lmms-eval model: (tiny model, saver, its own arguments, the kinds it has: force_simple values).
# qwen3_vl, qwen3_5: qwen_vl_utils resizes each image to 4096 px or more (96 x 64 here: 24 tokens);
# qwen3_5 thinks by default and keeps only what follows "</think>" (nothing, for a random model);
# internvl_hf (chat only): the 48 x 40 images are one 48 px tile (9 tokens); gemma3 (simple only):
# each image resized to the tower's 32 px (16 tokens), and a one-word system prompt makes each prompt
# 28 tokens, which gemma3 pads on the left to 32 (it pads to a multiple of 8), as most real prompts are
BASES = {"qwen3_vl": (partial(vlm_models.qwen3_vl, **LOUD), example.save_qwen3_vl, "min_pixels=4096,max_pixels=16384",
                      (True, False)),
         "internvl_hf": (partial(vlm_models.internvl, **LOUD), example.save_internvl, "max_patches=4", (False,)),
         "gemma3": (partial(vlm_models.gemma3, **MILD), example.save_gemma3, "system_prompt=You", (True,)),
         "qwen3_5": (partial(vlm_models.qwen3_5, **MILD), example.save_qwen3_5,
                     "min_pixels=4096,max_pixels=16384,enable_thinking=False", (True, False))}
TOKENS = {"qwen3_vl": 24, "internvl_hf": 9, "gemma3": 16, "qwen3_5": 24}  # visual tokens of each prompt


@pytest.fixture(scope="module", params=list(BASES))
def family(request, tmp_path_factory):
    """(root, base, its arguments, {force_simple: lmms-eval's own base model's (scores, samples)})."""
    build, save, args, kinds = BASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    save(str(root / "model"), build())
    (root / "tasks").mkdir()
    example.save_task(str(root / "tasks"))
    reference = {simple: run(root, request.param, args, force_simple=simple) for simple in kinds}
    for _, samples in reference.values():  # internvl_hf answers "" where generate raised
        assert all(r[0][0].strip() for _, r in samples["tiny_vqa"])
    return root, request.param, args, reference


def test_keeping_everything_gives_the_harness_numbers_of_each_base(family):
    """Each sample's text and each metric equal lmms-eval's own base model's, for each kind it has."""
    root, base, args, reference = family
    for simple, (ref_scores, ref_samples) in reference.items():
        scores, samples = run(root, "tome_plus", f"base={base},{args},method=tome,site=features,keep=1.0",
                              force_simple=simple)
        assert samples == ref_samples
        numbers = {k: v for k, v in scores["tiny_vqa"].items() if isinstance(v, float)}
        assert numbers and numbers == {k: v for k, v in ref_scores["tiny_vqa"].items() if isinstance(v, float)}


@pytest.mark.parametrize("model_args", ["method=tome,site=features,keep=0.5", "method=fastv,keep=0.5,k=1"])
def test_a_reducing_patch_of_each_base_logs_fewer_tokens(family, model_args, tmp_path):
    """lmms-eval's default kind (the simple one where the base has no other): every prompt's visual
    tokens cut to about half, at the features site or after FastV's layer; the answers are still
    words. FastV is refused on Qwen3.5 (its first layer is a linear-attention one)."""
    root, base, args, reference = family
    log = tmp_path / "kept.jsonl"
    model_args = f"base={base},{args},{model_args},log={log}"
    simple = False not in reference
    if base == "qwen3_5" and "fastv" in model_args:
        with pytest.raises(TypeError, match="linear-attention layers form no attention probabilities"):
            run(root, "tome_plus", model_args, force_simple=simple)
        return
    scores, samples = run(root, "tome_plus", model_args, force_simple=simple)
    record, *prompts = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["base"] == base and record["method"] == model_args.split("method=")[1].split(",")[0]
    n = TOKENS[base]
    assert len(prompts) == 4 and all(p["image_tokens"] == [n] and p["kept"][0][0] in (n // 2, (n + 1) // 2)
                                     for p in prompts)
    assert all(r[0][0].strip() for _, r in samples["tiny_vqa"]) and scores["tiny_vqa"]["words,none"] > 0


def test_internvl_hf_has_the_chat_kind_only():
    """lmms-eval's internvl_hf is a chat model: tome_plus's simple kind names the way out before
    loading anything."""
    from lmms_eval.models import get_model
    with pytest.raises(ValueError, match="no simple implementation.*--force_simple"):
        get_model("tome_plus", force_simple=True)(base="internvl_hf", pretrained="nowhere", method="tome")


def test_gemma3_has_the_simple_kind_only():
    """lmms-eval's gemma3 is a simple model: tome_plus's chat kind (lmms-eval's default) names the
    way out before loading anything."""
    from lmms_eval.models import get_model
    with pytest.raises(ValueError, match="no chat implementation.*--force_simple"):
        get_model("tome_plus")(base="gemma3", pretrained="nowhere", method="tome")
