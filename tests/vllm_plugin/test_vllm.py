"""tome_plus's vLLM plugin (`tome_plus.integrations.vllm`) on tiny random-weight checkpoints, run
in the vLLM environment (`bash examples/vllm_serving/test.sh`; skipped elsewhere). The reference is
tome_plus's HF path on the same weights (site="features"; positions="packed", kept tokens
numbered consecutively, as vLLM places them on the 1-D rotary families; positions="kept", each
kept token's own (t, h, w), on Qwen's M-RoPE), run by the project's environment
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
FAMILIES = {"llava": tiny.save_llava, "llava_next": tiny.save_llava_next, "llava_onevision": tiny.save_onevision,
            "qwen2_vl": tiny.save_qwen2_vl, "qwen2_5_vl": tiny.save_qwen2_5_vl}
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
REDUCED = [{"method": "tome", "keep": 0.25}, {"method": "pitome", "keep": 0.5}, {"method": "tome", "tokens": 10}]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return {name: save(str(tmp_path_factory.mktemp(name))) for name, save in FAMILIES.items()}


def engine(path, settings=None, videos=False, **extra):
    # a small KV cache: on a CPU vLLM otherwise reserves most of the machine's memory for it
    limits = {"image": 2, "video": 1} if videos else {"image": 2}
    return vllm.LLM(model=path, enforce_eager=True, dtype="float32", max_model_len=1024, seed=0, max_num_seqs=4,
                    limit_mm_per_prompt=limits, kv_cache_memory_bytes=256 << 20,
                    hf_overrides=None if settings is None else {"tome_plus": settings}, **extra)


def answers(family, path, settings=None, kind="image", prompts=None, rounds=1, **extra):
    """Greedy new tokens, their log-probabilities and the prompt length per prompt of
    `tiny.prompts(family, kind)` (or `prompts`), `rounds` times over in one engine."""
    from vllm.distributed import cleanup_dist_env_and_memory
    llm = engine(path, settings, videos=kind == "video", **extra)
    try:
        prompts = prompts or tiny.prompts(family, kind)
        if kind == "image":
            requests = [{"prompt": text, "multi_modal_data": {"image": [tiny.image(*s) for s in sizes]}}
                        for text, sizes in prompts]
        else:
            requests = [{"prompt": text, "multi_modal_data": {"video": tiny.vllm_video(family, clip)}}
                        for text, clip in prompts]
        outs = [out for _ in range(rounds)
                for out in llm.generate(requests, vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0))]
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


def close(got, want):
    """vLLM's answers and the HF features site's: the same prompt lengths (vLLM's placeholders:
    the count the HF model kept), the same greedy tokens, log-probabilities within 1e-3."""
    assert [a["prompt"] for a in got] == [b["prompt"] for b in want], (got, want)
    for a, b in zip(got, want):
        assert a["ids"] == b["ids"], (got, want)
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_key_vllm_runs_as_its_own_and_keeping_everything_too(family, checkpoints):
    path = checkpoints[family]
    own = answers(family, path)
    hf = hf_answers(path)
    assert [a["ids"] for a in own] == [a["ids"] for a in hf]  # the HF model, unpatched
    assert [a["prompt"] for a in own] == [a["prompt"] for a in hf]
    assert answers(family, path, {"method": "tome", "keep": 1.0}) == own


@pytest.mark.parametrize("settings", REDUCED, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_answers_equal_the_hf_features_site(family, settings, checkpoints):
    path = checkpoints[family]
    got, want = answers(family, path, settings), hf_answers(path, settings)
    close(got, want)
    for a, b, (_, sizes) in zip(got, want, tiny.prompts(family)):
        assert a["prompt"] < b["full"]
        if family == "llava":  # 64 features per image, each reduced to the settings' count
            assert a["prompt"] == b["full"] - len(sizes) * (64 - image_tokens(settings))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_tprune_ranks_by_the_first_layers_attention_as_the_hf_site(family, checkpoints):
    """Zero-TPrune's graph is the language model's first layer's attention among an image's
    tokens (vLLM's own norm, projections and rotary embedding, M-RoPE's at the tokens' (t, h, w)):
    the same kept tokens and answers."""
    path = checkpoints[family]
    settings = {"method": "zero_tprune", "tokens": 12}
    got, want = answers(family, path, settings), hf_answers(path, settings)
    close(got, want)
    assert all(a["prompt"] < b["full"] for a, b in zip(got, want))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videos_as_vllm_and_the_hf_features_site(family, checkpoints):
    """A clip's tokens reduced as one (OneVision: frames pooled 2 x 2, one newline after them;
    Qwen: the kept tokens at their (t, h, w)): unpatched and keep=1.0 are vLLM's own (and the HF
    model's); reduced, the HF features site's answers."""
    path = checkpoints[family]
    own = answers(family, path, kind="video")
    assert [a["ids"] for a in own] == [a["ids"] for a in hf_answers(path, kind="video")]
    assert answers(family, path, {"method": "tome", "keep": 1.0}, kind="video") == own
    for settings in ({"method": "tome", "keep": 0.25}, {"method": "pitome", "tokens": 10}):
        got, want = answers(family, path, settings, kind="video"), hf_answers(path, settings, kind="video")
        close(got, want)
        assert all(a["prompt"] < b["full"] for a, b in zip(got, want))


def test_qwen2_5_text_after_a_long_clip_resumes_where_vllm_puts_it(checkpoints):
    """A clip whose temporal positions (scaled by seconds per frame) pass its rows and columns:
    keeping everything through the plugin's positions (the processor's placeholders, the kept
    tokens' channels, `recompute_mrope_positions`) answers as vLLM's own numbering."""
    path = checkpoints["qwen2_5_vl"]
    own = answers("qwen2_5_vl", path, kind="video", prompts=[tiny.LONG_CLIP])
    assert answers("qwen2_5_vl", path, {"method": "tome", "keep": 1.0}, kind="video", prompts=[tiny.LONG_CLIP]) == own


@pytest.mark.parametrize("settings", [{"method": "divprune", "keep": 0.25}, {"method": "visionzip", "tokens": 10}],
                         ids=["divprune", "visionzip"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_baselines_as_the_hf_features_site(family, settings, checkpoints):
    """DivPrune's max-min selection and VisionZip's dominant + contextual tokens per image (NeXT:
    newlines aside; Qwen: kept tokens at their (t, h, w); VisionZip ranks by the first decoder
    layer's attention there): the HF features site's prompt lengths and answers."""
    got, want = answers(family, checkpoints[family], settings), hf_answers(checkpoints[family], settings)
    close(got, want)
    assert all(a["prompt"] < b["full"] for a, b in zip(got, want))


TOWER = [{"method": "tome", "r": 4, "site": "tower"}, {"method": "pitome", "keep": 0.5, "site": "tower"},
         {"method": "zero_tprune", "r": 6, "site": "tower"}, {"method": "visionzip", "tokens": 12, "site": "tower"}]


@pytest.mark.parametrize("settings", TOWER, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items() if k != "site"))
def test_llava_tower_site_as_the_hf_tower_site(settings, checkpoints):
    """LLaVA-1.5's CLIP tower reducing inside its layers (vLLM's own layers, tome_plus's layer
    step and schedule): the HF tower site's features, prompt lengths and answers."""
    got, want = answers("llava", checkpoints["llava"], settings), hf_answers(checkpoints["llava"], settings)
    close(got, want)
    assert all(a["prompt"] < b["full"] for a, b in zip(got, want))


def test_llava_tower_site_removing_nothing_is_vllms_own(checkpoints):
    own = answers("llava", checkpoints["llava"])
    assert answers("llava", checkpoints["llava"], {"method": "tome", "r": 0, "site": "tower"}) == own


def test_qwen_chunked_prefill_and_the_prefix_cache_give_the_same_answers(checkpoints):
    """Prefill chunks of 8 tokens split the items (and fall between the two of one prompt), each
    step's `recompute_mrope_positions` placing only its part; the second round reads the first's
    cached blocks: the same answers as one chunk, keeping everything (vLLM's own) and reduced."""
    path = checkpoints["qwen2_5_vl"]
    chunked = dict(max_num_batched_tokens=8, enable_chunked_prefill=True, enable_prefix_caching=True)
    own = answers("qwen2_5_vl", path)
    assert answers("qwen2_5_vl", path, {"method": "tome", "keep": 1.0}, rounds=2, **chunked) == own * 2
    settings = {"method": "tome", "keep": 0.5}
    assert answers("qwen2_5_vl", path, settings, rounds=2, **chunked) == answers("qwen2_5_vl", path, settings) * 2


@pytest.mark.parametrize("settings,message", [
    ({"method": "fastv", "keep": 0.5}, "'fastv' prunes inside the language model.*paged attention"),
    ({"method": "atp", "keep": 0.5}, "'atp' prunes inside the language model"),
    ({"method": "pyramiddrop"}, "'pyramiddrop' prunes inside the language model"),
    ({"method": "sparsevlm"}, "'sparsevlm' prunes inside the language model"),
    ({"method": "tome", "keep": 0.5, "kv": "a2sf"}, "kv policies .* paged KV cache"),
    ({"method": "tomato", "keep": 0.5}, "method 'tomato' is not served in vLLM"),
    ({"method": "tome", "keep": 0.5, "speed": 2}, "unknown option.s. \\['speed'\\] for method 'tome'"),
    ({"method": "tome", "keep": 1.5}, "keep"),
    ({"method": "tome", "flops": 0.5}, "the image features are reduced once per image: give tokens= .*not flops=0.5"),
    ({"method": "tome", "tokens": 65}, "tokens=65 is more than the 64 image tokens"),
    ({"method": "tome", "keep": 0.5, "site": "llm"}, "site='llm'; in vLLM the methods reduce the image features"),
    ({"method": "divprune", "keep": 0.5, "site": "tower"}, "'divprune' reduces the image features .site='features'., not in the tower"),
    ({"method": "tome", "flops": 0.01, "site": "tower"}, "flops=0.01 is below what this method reaches on this model"),
    ({"method": "tome", "r": 4, "site": "tower", "positions": "packed"}, "positions= places the kept tokens of site='features'"),
    ({"method": "tome", "keep": 0.5, "positions": "kept"}, "positions='kept'; vLLM numbers"),
    ("tome", "hf_overrides\\['tome_plus'\\] must be a dict with a 'method'"),
])
def test_bad_settings_are_refused_at_start_up(settings, message, checkpoints):
    with pytest.raises(ValueError, match=f"tome_plus: {message}") as err:
        engine(checkpoints["llava"], settings)
    assert len(str(err.value).splitlines()) == 1  # one line that names it


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_the_tower_site_is_llava_15s(family, checkpoints):
    with pytest.raises(ValueError, match=f"tome_plus: site='tower' is served on LLaVA-1.5's CLIP tower.*this model "
                                         f"\\({family}, ") as err:
        engine(checkpoints[family], {"method": "tome", "r": 4, "site": "tower"})
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("settings,extra,message", [
    ({"method": "tome", "keep": 0.5, "positions": "packed"}, {},
     "positions='packed'; qwen2_5_vl's M-RoPE places each kept token at its own"),
    ({"method": "tome", "keep": 0.5}, {"video_pruning_rate": 0.5},
     "vLLM's video pruning .video_pruning_rate=0.5. and tome_plus would both reduce"),
])
def test_qwen_refuses_packed_positions_and_vllms_own_video_pruning(settings, extra, message, checkpoints):
    with pytest.raises(ValueError, match=f"tome_plus: {message}") as err:
        engine(checkpoints["qwen2_5_vl"], settings, **extra)
    assert len(str(err.value).splitlines()) == 1
