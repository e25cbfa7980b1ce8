"""tome_plus's vLLM plugin (`tome_plus.integrations.vllm`) on tiny random-weight checkpoints, run
in the vLLM environment (`bash examples/vllm_serving/test.sh`; skipped elsewhere). The reference is
tome_plus's HF path on the same weights (site="features", positions="packed": kept tokens
numbered consecutively, as vLLM places them), run by the project's environment
(`TOME_PLUS_HF_PYTHON`, `hf_reference.py`); keeping everything, vLLM's own model."""
import gc
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: fast to start
vllm = pytest.importorskip("vllm", reason="the vLLM tests run in vLLM's environment: bash examples/vllm_serving/test.sh")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402

NEW_TOKENS = 6
FAMILIES = {"llava": tiny.save_llava, "llava_next": tiny.save_llava_next, "llava_onevision": tiny.save_onevision}
REDUCED = [{"method": "tome", "keep": 0.25}, {"method": "pitome", "keep": 0.5}, {"method": "tome", "tokens": 10}]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return {name: save(str(tmp_path_factory.mktemp(name))) for name, save in FAMILIES.items()}


def engine(path, settings=None, videos=False):
    # a small KV cache: on a CPU vLLM otherwise reserves most of the machine's memory for it
    limits = {"image": 2, "video": 1} if videos else {"image": 2}
    return vllm.LLM(model=path, enforce_eager=True, dtype="float32", max_model_len=1024, seed=0, max_num_seqs=4,
                    limit_mm_per_prompt=limits, kv_cache_memory_bytes=256 << 20,
                    hf_overrides=None if settings is None else {"tome_plus": settings})


def answers(path, settings=None, kind="image"):
    """Greedy new tokens, their log-probabilities and the prompt length per prompt of
    `tiny.PROMPTS` (images) or `tiny.VIDEO_PROMPTS`."""
    from vllm.distributed import cleanup_dist_env_and_memory
    llm = engine(path, settings, videos=kind == "video")
    try:
        if kind == "image":
            requests = [{"prompt": text, "multi_modal_data": {"image": [tiny.image(*s) for s in sizes]}}
                        for text, sizes in tiny.PROMPTS]
        else:
            requests = [{"prompt": text, "multi_modal_data": {"video": tiny.video(*clip)}}
                        for text, clip in tiny.VIDEO_PROMPTS]
        outs = llm.generate(requests, vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0))
        return [{"ids": list(o.outputs[0].token_ids), "prompt": len(o.prompt_token_ids),
                 "logprobs": [lp[i].logprob
                              for lp, i in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]} for o in outs]
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def hf_answers(path, settings=None, kind="image"):
    python = os.environ.get("TOME_PLUS_HF_PYTHON")
    if not python:
        pytest.skip("TOME_PLUS_HF_PYTHON names the project's python (tome_plus[hf]); examples/vllm_serving/test.sh sets it")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_reference.py")
    done = subprocess.run([python, script, path, json.dumps(settings), str(NEW_TOKENS), kind], capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def image_tokens(settings):
    """Placeholders per LLaVA-1.5 image the plugin asks for (the tiny tower: 64 features per image)."""
    from tome_plus.integrations.vllm import settings as S
    from types import SimpleNamespace
    return S.check_count(S.read(SimpleNamespace(tome_plus=dict(settings), num_hidden_layers=4)), 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_key_vllm_runs_as_its_own_and_keeping_everything_too(family, checkpoints):
    path = checkpoints[family]
    own = answers(path)
    hf = hf_answers(path)
    assert [a["ids"] for a in own] == [a["ids"] for a in hf]  # the HF model, unpatched
    assert [a["prompt"] for a in own] == [a["prompt"] for a in hf]
    assert answers(path, {"method": "tome", "keep": 1.0}) == own


@pytest.mark.parametrize("settings", REDUCED, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_answers_equal_the_hf_features_site(family, settings, checkpoints):
    path = checkpoints[family]
    got, want = answers(path, settings), hf_answers(path, settings)
    for a, b, (_, sizes) in zip(got, want, tiny.PROMPTS):
        assert a["prompt"] == b["prompt"], (got, want)  # vLLM's placeholders: the count the HF model kept
        if family == "llava":  # 64 features per image, each reduced to the settings' count
            assert a["prompt"] == b["full"] - len(sizes) * (64 - image_tokens(settings)) < b["full"]
        assert a["ids"] == b["ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_tprune_ranks_by_the_first_layers_attention_as_the_hf_site(family, checkpoints):
    """Zero-TPrune's graph is the language model's first layer's attention among an image's
    tokens (vLLM's own norm, projections and rotary embedding): the same kept tokens and answers."""
    path = checkpoints[family]
    settings = {"method": "zero_tprune", "tokens": 12}
    got, want = answers(path, settings), hf_answers(path, settings)
    for a, b in zip(got, want):
        assert a["prompt"] == b["prompt"] < b["full"], (got, want)
        assert a["ids"] == b["ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


def test_onevision_videos_as_vllm_and_the_hf_features_site(checkpoints):
    """A clip's frames (pooled 2 x 2, one newline after them) reduced as one: unpatched and
    keep=1.0 are vLLM's own (and the HF model's); reduced, the HF features site's answers."""
    path = checkpoints["llava_onevision"]
    own = answers(path, kind="video")
    assert [a["ids"] for a in own] == [a["ids"] for a in hf_answers(path, kind="video")]
    assert answers(path, {"method": "tome", "keep": 1.0}, kind="video") == own
    for settings in ({"method": "tome", "keep": 0.25}, {"method": "pitome", "tokens": 10}):
        got, want = answers(path, settings, kind="video"), hf_answers(path, settings, kind="video")
        for a, b in zip(got, want):
            assert a["prompt"] == b["prompt"] < b["full"]
            assert a["ids"] == b["ids"]
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


@pytest.mark.parametrize("settings,message", [
    ({"method": "fastv", "keep": 0.5}, "'fastv' prunes inside the language model.*paged attention"),
    ({"method": "atp", "keep": 0.5}, "'atp' prunes inside the language model"),
    ({"method": "tome", "keep": 0.5, "kv": "a2sf"}, "kv policies .* paged KV cache"),
    ({"method": "tomato", "keep": 0.5}, "method 'tomato' is not served in vLLM"),
    ({"method": "tome", "keep": 0.5, "speed": 2}, "unknown option.s. \\['speed'\\] for method 'tome'"),
    ({"method": "tome", "keep": 1.5}, "keep"),
    ({"method": "tome", "flops": 0.5}, "the image features are reduced once per image: give tokens= .*not flops=0.5"),
    ({"method": "tome", "tokens": 65}, "tokens=65 is more than the 64 image tokens"),
    ({"method": "tome", "keep": 0.5, "site": "llm"}, "site='llm'; in vLLM the methods reduce the image features"),
    ({"method": "tome", "keep": 0.5, "positions": "kept"}, "positions='kept'; vLLM numbers"),
    ("tome", "hf_overrides\\['tome_plus'\\] must be a dict with a 'method'"),
])
def test_bad_settings_are_refused_at_start_up(settings, message, checkpoints):
    with pytest.raises(ValueError, match=f"tome_plus: {message}") as err:
        engine(checkpoints["llava"], settings)
    assert len(str(err.value).splitlines()) == 1  # one line that names it
