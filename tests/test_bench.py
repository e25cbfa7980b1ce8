"""`tome-plus bench` end to end on a small model, and the CPU peak-memory meter."""
import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

import tome_plus
from tome_plus.tools import bench, bench_hf, measure, models, timing
from tome_plus.tools.cli import main
from tome_plus.tools.timing import PeakMemory

from test_flops import plain_math_flops, vit_flops

TINY = ["--model", "vit_tiny_patch16_224", "--device", "cpu", "--dtype", "float32", "--warmup", "0",
        "--no-progress"]


def test_peak_memory_counts_live_tensors():
    with PeakMemory() as mem:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # another MiB while a is alive
        del a, b
        c = torch.zeros(512, 256)  # half a MiB after both are gone
    assert mem.peak == 2 * 2**20
    del c
    assert mem.current == 0


def test_bench_cli_end_to_end(tmp_path, capsys, monkeypatch):
    # A clock that only moves inside transformer blocks, by the tokens each block is given: the
    # timings and their ratio then follow from the token counts alone, without machine noise.
    clock = SimpleNamespace(now=0.0)
    tick = 1e-4  # seconds per token entering a block

    def advance(module, args):
        if isinstance(module, Block):
            clock.now += args[0].shape[1] * tick
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    hook = torch.nn.modules.module.register_module_forward_pre_hook(advance)
    out_json, out_csv = tmp_path / "new" / "folder" / "r.json", tmp_path / "r.csv"
    try:
        main(["bench", *TINY, "--batch-size", "2", "--runs", "2", "--r", "8",
              "--json", str(out_json), "--csv", str(out_csv)])
    finally:
        hook.remove()
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "baseline" in printed and "graphs: n/a (CPU)" in printed
    report = json.loads(out_json.read_text())  # its missing folders were created
    assert report["precision"] == "fp32" and report["graphs"] is None and report["graph_speedup"] is None
    base, patched = report["results"]
    assert report["options"] == {"r": 8}
    tokens_in = [197 - 8 * i for i in range(12)]  # r=8 removes 8 tokens in each of the 12 blocks
    assert patched["tokens"] == [n - 8 for n in tokens_in]
    assert base["ms_per_batch"] == pytest.approx(12 * 197 * tick * 1e3)
    assert patched["ms_per_batch"] == pytest.approx(sum(tokens_in) * tick * 1e3)
    assert base["images_per_s"] == pytest.approx(2 / (12 * 197 * tick))
    assert report["speedup"] == pytest.approx(12 * 197 / sum(tokens_in))
    reference = timm.create_model("vit_tiny_patch16_224").eval()
    one = torch.randn(1, 3, 224, 224)
    assert base["gflops_per_image"] * 1e9 == pytest.approx(vit_flops(192, 12, 197, 3 * 16 * 16, 1000))
    assert base["gflops_per_image"] * 1e9 == pytest.approx(plain_math_flops(reference, one))
    tome_plus.patch(reference, "tome", r=8)
    assert patched["gflops_per_image"] * 1e9 == pytest.approx(plain_math_flops(reference, one))
    assert report["flops_ratio"] == pytest.approx(patched["gflops_per_image"] / base["gflops_per_image"])
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["name"] for r in rows] == ["baseline", "tome"]


def run_cli(argv, capsys):
    """Exit status and stderr of `tome-plus ARGV`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--runs", "0"], "argument --runs: must be >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["--method", "nope"], "--method: unknown method 'nope'"),
    (["--budget", "r16"], "--budget takes KIND=VALUE"),
    (["--budget", "r=(4,8,12)"], "r as a tuple is ToMe's schedule (r, inflect), got (4, 8, 12)"),
    (["--budget", "r=abc"], "r must be an int, a per-layer list or (r, inflect), got 'abc'"),
    (["--r", "-1"], "r must be >= 0, got -1"),
    (["--keep", "2"], "keep must lie in (0, 1], got 2.0"),
    (["--option", "nope=1"], "unknown option(s) ['nope'] for method 'tome'"),
    (["--method", "diffrate", "--option", "schedule=/no/such.json"], "schedule='/no/such.json': no such file"),
    (["--graphs"], "--graphs needs a CUDA device (CUDA graphs); this run is on cpu"),
    (["--precision", "half"], "--precision half needs --dtype float16 or bfloat16"),
    (["--dtype", "float16", "--precision", "fast"], "argument --precision: invalid choice: 'fast'"),
    (["--method", "fastv", "--keep", "0.5"], "method 'fastv' prunes visual tokens inside the language model of a "
                                             "vision-language model; a timm model has none"),
])
def test_bench_refuses_bad_values_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("refused values must stop before the run"))
    status, err = run_cli(["bench", *TINY, *argv], capsys)
    assert status == 2
    assert err.startswith("tome-plus bench: error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_cuda_without_gpu_is_a_usage_error(capsys):
    status, err = run_cli(["bench", "--device", "cuda", "--no-progress"], capsys)
    assert status == 2 and err == ("tome-plus bench: error: argument --device: cuda: no CUDA GPU is available "
                                   "to torch here; use --device cpu\n")


def test_bench_unwritable_output_refused_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the run must not start"))
    (tmp_path / "file").write_text("")
    status, err = run_cli(["bench", *TINY, "--json", str(tmp_path / "file" / "r.json")], capsys)
    assert status == 2 and err.startswith("tome-plus bench: error: --json ") and "cannot create folder" in err
    status, err = run_cli(["bench", *TINY, "--csv", str(tmp_path)], capsys)
    assert status == 2 and "is a folder" in err


def test_errors_during_the_run_exit_1_in_one_line(capsys):
    # a budget this model cannot take (known once it is built), and a model timm lacks
    status, err = run_cli(["bench", *TINY, "--img-size", "64", "--batch-size", "1", "--runs", "1",
                           "--flops", "0.01"], capsys)
    assert status == 1 and err.startswith("tome-plus bench: error: flops=0.01 is below") and err.count("\n") == 1
    status, err = run_cli(["bench", "--model", "no_such_model", "--device", "cpu", "--no-progress"], capsys)
    assert status == 1 and "no_such_model" in err and err.count("\n") == 1


def test_argparse_errors_are_one_line(capsys):
    status, err = run_cli(["bench", "--no-such-option"], capsys)
    assert status == 2 and err == "tome-plus: error: unrecognized arguments: --no-such-option\n"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "tome_plus.tools.cli", "bench", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--flops" in out and "--json" in out


# ---------------------------------------------------------------- precision, graphs, shared timing

def test_interleave_runs_every_fn_once_per_round_and_drops_warmup(monkeypatch):
    clock = SimpleNamespace(now=0.0, round=0)
    calls, syncs = [], []

    def fn(name, seconds):
        def call():
            calls.append(name)
            clock.now += seconds * (10 if clock.round == 0 else 1)  # the warm-up round is slow
        return call
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    step = lambda: setattr(clock, "round", len(calls) // 2)  # noqa: E731
    times = timing.interleave({"a": fn("a", 1.0), "b": fn("b", 3.0)}, warmup=1, runs=2,
                              sync=lambda: syncs.append(1), step=step)
    assert calls == ["a", "b"] * 3  # round robin: a drift over time hits a and b alike
    assert times == {"a": [1.0, 1.0], "b": [3.0, 3.0]}  # warm-up round not kept
    assert len(syncs) == 2 * len(calls)  # before and after every call: queued GPU work is timed


def test_real_capture_failing_on_cpu_is_reported_and_eager_still_timed():
    # the real `capture_graph` (CPU tensors cannot be captured): the error is a result, not a crash
    calls = []
    timing = measure.time_forwards({"double": lambda x: calls.append(1) or x * 2}, torch.ones(3), warmup=1, runs=2,
                                 graphs=True)["double"]
    assert timing.graph is None and timing.graph_equal is None
    assert timing.graph_error.startswith("ValueError: ") and "cuda" in timing.graph_error
    assert len(timing.eager) == 2 and len(calls) == 3  # 1 warm-up + 2 timed, nothing else ran


def test_autocast_probe():
    assert timing.autocast_supported("cpu", torch.bfloat16)
    assert not timing.autocast_supported("cpu", torch.float32)  # torch disables it: refused, not run as fp32


@pytest.mark.parametrize("dtype,precision,label,weights", [
    ("float32", None, "fp32", torch.float32),
    ("bfloat16", None, "autocast bf16", torch.float32),  # the default for half dtypes
    ("bf16", "autocast", "autocast bf16", torch.float32),
    ("float16", "half", "fp16 weights", torch.float16),
    ("bfloat16", "half", "bf16 weights", torch.bfloat16),
])
def test_precision_resolution(dtype, precision, label, weights):
    prec = bench.resolve_precision("cpu", dtype, precision)
    assert prec.label == label and prec.tensor_dtype == weights
    layer = torch.nn.Linear(4, 4).to(prec.tensor_dtype)
    out = prec.forward(layer)(torch.randn(2, 4, dtype=prec.tensor_dtype))
    assert out.dtype == (prec.dtype if prec.mode else torch.float32) and not out.requires_grad


def test_autocast_this_torch_lacks_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(timing, "autocast_supported", lambda device_type, dtype: False)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("refused values must stop before the run"))
    status, err = run_cli(["bench", *TINY, "--dtype", "float16"], capsys)
    assert status == 2 and err == ("tome-plus bench: error: --precision autocast: this torch has no cpu autocast "
                                   "to float16; use --precision half or another --dtype\n")
    assert bench.resolve_graphs("cpu") is None
    with pytest.raises(bench.UsageError):
        bench.resolve_graphs("cpu", True)


@pytest.mark.parametrize("precision,label,weights", [("autocast", "autocast bf16", torch.float32),
                                                      ("half", "bf16 weights", torch.bfloat16)])
def test_bench_bf16_on_cpu_reports_and_runs_its_precision(precision, label, weights, tmp_path, capsys):
    seen = set()  # (weight dtype, output dtype) of every Linear the forwards ran

    def record(module, args, out):
        if isinstance(module, torch.nn.Linear):
            seen.add((module.weight.dtype, out.dtype))
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    out_csv = tmp_path / "r.csv"
    try:
        report = bench.main([*TINY, "--dtype", "bfloat16", "--precision", precision, "--img-size", "64",
                             "--batch-size", "1", "--runs", "1", "--r", "1", "--csv", str(out_csv)])
    finally:
        hook.remove()
    assert seen == {(weights, torch.bfloat16)}  # autocast: fp32 weights, bf16 math; half: all bf16
    assert report["precision"] == label and report["dtype"] == "bfloat16" and report["graphs"] is None
    for r in report["results"]:
        assert r["graph_ms_per_batch"] is None and r["graph_error"] is None
    printed = capsys.readouterr().out
    assert label in printed.splitlines()[0] and "graphs: n/a (CPU)" in printed
    assert {r["precision"] for r in csv.DictReader(out_csv.open())} == {label}


def fake_capture(failing: int = -1, off_by: float = 0.0):
    """A stand-in for `timing.capture_graph` on CPU: replay reruns the forward on the captured
    input; capture number `failing` raises, and the second model's replays are off by `off_by`."""
    captured = []

    def capture(forward, x, warmup=3):
        captured.append(forward)
        if len(captured) - 1 == failing:  # as torch.cuda.graph does: the cause, then a second error at its exit
            try:
                raise RuntimeError("CUDA error: operation not permitted\nwhen stream is capturing")
            except RuntimeError:
                raise RuntimeError("capture invalidated")
        static_x, shift = x.clone(), off_by if len(captured) == 2 else 0.0
        return lambda: forward(static_x) + shift
    return capture


def test_graph_timings_share_the_interleaved_loop_and_are_checked_against_eager(monkeypatch):
    monkeypatch.setattr(measure, "resolve_graphs", lambda device, graphs=None: True)
    monkeypatch.setattr(timing, "capture_graph", fake_capture(off_by=1.0))
    loops = []
    real = timing.interleave
    monkeypatch.setattr(timing, "interleave", lambda fns, *a, **k: loops.append(list(fns)) or real(fns, *a, **k))
    report = measure.run_bench("vit_tiny_patch16_224", "tome", {"r": 1}, img_size=64, batch_size=1, warmup=0,
                             runs=2, progress=False, graphs=True)
    # one loop: eager and graphed calls of both models interleaved
    assert loops == [[("baseline", "eager"), ("tome", "eager"), ("baseline", "graph"), ("tome", "graph")]]
    base, patched = report["results"]
    assert base["graph_equal"] is True and base["graph_max_abs_diff"] == 0.0
    assert patched["graph_equal"] is False and patched["graph_max_abs_diff"] == pytest.approx(1.0)
    for r in (base, patched):
        assert r["graph_ms_per_batch"] > 0 and r["graph_images_per_s"] == pytest.approx(1e3 / r["graph_ms_per_batch"])
    assert report["graph_speedup"] == pytest.approx(patched["graph_images_per_s"] / base["graph_images_per_s"])
    table = bench.format_table(report)
    assert "graph ms" in table and "x graphed" in table
    assert "graphs: baseline equals eager; tome differs from eager by up to 1" in table


def test_failed_capture_is_reported_and_the_run_goes_on(monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "resolve_graphs", lambda device, graphs=None: True)
    monkeypatch.setattr(timing, "capture_graph", fake_capture(failing=1))
    report = measure.run_bench("vit_tiny_patch16_224", "tome", {"r": 1}, img_size=64, batch_size=1, warmup=0,
                             runs=1, progress=False, graphs=True)
    base, patched = report["results"]
    error = "RuntimeError: capture invalidated (after RuntimeError: CUDA error: operation not permitted when " \
            "stream is capturing)"
    assert patched["graph_error"] == error and patched["graph_ms_per_batch"] is None
    assert patched["ms_per_batch"] > 0 and base["graph_ms_per_batch"] > 0 and base["graph_equal"]
    assert report["graph_speedup"] is None and report["speedup"] > 0
    table = bench.format_table(report)
    assert f"tome capture failed: {error}" in table and "x graphed" not in table
    bench.write_csv(report, str(tmp_path / "r.csv"))
    assert [r["graph_error"] for r in csv.DictReader((tmp_path / "r.csv").open())] == ["", error]


# ---------------------------------------------------------------- --hf: random-weight LLaVA shapes

HF_TINY = ["bench", "--hf", "llava-tiny", "--device", "cpu", "--dtype", "float32", "--warmup", "0", "--no-progress"]


def tick_per_token(monkeypatch, tick: float = 1e-4):
    """A fake clock that moves only inside tower and LLM layers, by the tokens each one is given
    (hooks go on the built model; its patched twin copies them). Returns what the clock saw."""
    from tome_plus.tools import hf_shapes
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    clock = SimpleNamespace(now=0.0)
    real_build = hf_shapes.build_model

    def advance(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        clock.now += hidden.shape[1] * tick

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, (CLIPEncoderLayer, LlamaDecoderLayer)):
                module.register_forward_pre_hook(advance, with_kwargs=True)
        return model
    monkeypatch.setattr(hf_shapes, "build_model", build)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    return clock


def test_hf_bench_llava_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    tick = 1e-4
    tick_per_token(monkeypatch, tick)
    out_json, out_csv = tmp_path / "new" / "r.json", tmp_path / "r.csv"
    main([*HF_TINY, "--batch-size", "2", "--runs", "2", "--r", "4", "--json", str(out_json), "--csv", str(out_csv)])
    printed = capsys.readouterr().out
    assert printed.startswith("llava-tiny: ") and "speed-up: vision" in printed
    assert "image tokens into the LLM" in printed and "graphs: n/a" in printed
    report = json.loads(out_json.read_text())
    for key in ("hf", "method", "options", "device_name", "precision", "batch_size", "text_tokens",
                "image_placeholders",
                "transformers", "results", "vision_speedup", "prefill_speedup", "llm_speedup", "image_token_ratio",
                "tower_flops_ratio", "llm_flops_ratio", "prefill_flops_ratio", "memory_ratio"):
        assert key in report, key
    assert report["hf"] == "llava-tiny" and report["options"] == {"r": 4} and report["image_placeholders"] == 64
    base, patched = report["results"]
    # 64 patches + CLS; r=4 in the first 3 of 4 layers (the features are layer -2's); CLS dropped
    tokens_in = [65, 61, 57, 53]
    assert patched["tokens"] == [61, 57, 53, 53] and base["tokens"] == []
    assert (base["image_tokens"], patched["image_tokens"]) == (64, 52)
    assert (base["prompt_tokens"], patched["prompt_tokens"]) == (32 + 64, 32 + 52)
    # the fake clock: every ratio follows from the token counts alone
    assert base["vision_ms_per_batch"] == pytest.approx(4 * 65 * tick * 1e3)
    assert patched["vision_ms_per_batch"] == pytest.approx(sum(tokens_in) * tick * 1e3)
    assert base["vision_images_per_s"] == pytest.approx(2 / (4 * 65 * tick))
    assert base["llm_ms_per_batch"] == pytest.approx(2 * 96 * tick * 1e3)
    assert patched["llm_ms_per_batch"] == pytest.approx(2 * 84 * tick * 1e3)
    assert base["prefill_ms_per_batch"] == pytest.approx((4 * 65 + 2 * 96) * tick * 1e3)
    assert patched["prefill_ms_per_batch"] == pytest.approx((sum(tokens_in) + 2 * 84) * tick * 1e3)
    assert report["llm_speedup"] == pytest.approx(96 / 84)
    assert report["prefill_speedup"] == pytest.approx((4 * 65 + 2 * 96) / (sum(tokens_in) + 2 * 84))
    # fewer image tokens, fewer FLOPs in every part
    assert report["image_token_ratio"] == pytest.approx(52 / 64)
    assert patched["llm_gflops_per_prompt"] < base["llm_gflops_per_prompt"]
    assert report["tower_flops_ratio"] < 1 and report["llm_flops_ratio"] < 1 and report["prefill_flops_ratio"] < 1
    for r in (base, patched):
        parts = r["tower_gflops_per_image"] + r["projector_gflops_per_image"] + r["llm_gflops_per_prompt"]
        assert parts == pytest.approx(r["prefill_gflops_per_prompt"])  # the parts make up the forward
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["name"] for r in rows] == ["baseline", "tome"] and rows[1]["tokens"] == "61 57 53 53"


def test_hf_bench_zero_budget_changes_nothing(capsys):
    pytest.importorskip("transformers")
    report = bench.main(["--hf", "llava-tiny", "--device", "cpu", "--warmup", "0", "--runs", "1", "--batch-size", "1",
                         "--r", "0", "--no-progress"])
    base, patched = report["results"]
    assert base["image_tokens"] == patched["image_tokens"] == 64
    assert report["tower_flops_ratio"] == 1 and report["llm_flops_ratio"] == 1 and report["prefill_flops_ratio"] == 1


def test_hf_bench_llm_flops_count_zero_tprunes_graph_and_iterations():
    """The bench's LLM FLOPs hold the scoring's own: Zero-TPrune at the features site counts at
    least its attention graph (the I' stage's over the 64 tokens, the I-stage's over the 48
    survivors of the S-stage) and its 30 PageRank products beyond ToMe keeping as many tokens."""
    pytest.importorskip("transformers")
    from tome_plus.tools import hf_shapes
    base = hf_shapes.build_llava("llava-tiny")
    inputs = hf_shapes.make_batch(base, "llava-tiny", 1, 8)
    llm = {}
    for method in ("tome", "zero_tprune"):
        model = tome_plus.patch(models.shared_copy(base), method, site="features", keep=0.5)
        llm[method] = bench_hf.llava_flops(model, inputs)["llm"]
        assert tome_plus.inspect(model).llm_kept.tolist() == [[32]]
    text = base.config.text_config
    heads, dim, n, m = text.num_attention_heads, text.hidden_size // text.num_attention_heads, 64, 48
    graph = 2 * heads * dim * (n * n + m * m) + 30 * 2 * heads * m * m
    assert llm["zero_tprune"] - llm["tome"] >= graph


def test_hf_patched_twin_shares_weights_and_llm_alone_sees_what_the_forward_gives_it():
    pytest.importorskip("transformers")
    from tome_plus.tools import hf_shapes
    base = hf_shapes.build_llava("llava-tiny")
    twin = tome_plus.patch(models.shared_copy(base), "tome", r=4)
    assert all(a is b for a, b in zip(base.parameters(), twin.parameters()))
    assert not hasattr(base, "_tome_plus") and type(base).__name__ == "LlavaForConditionalGeneration"
    inputs = hf_shapes.make_batch(base, "llava-tiny", 2, 8)
    with torch.no_grad():
        for model, n_image in ((base, 64), (twin, 52)):
            llm_kwargs = bench_hf.llm_inputs(model, inputs)
            assert llm_kwargs["inputs_embeds"].shape[:2] == llm_kwargs["attention_mask"].shape == (2, 8 + n_image)
            alone = bench_hf.llm_prefill(model, llm_kwargs)
            torch.testing.assert_close(alone, bench_hf.llava_prefill(model, inputs).logits)


@pytest.mark.parametrize("shape,placeholders,kept", [("llava-next-tiny", 88, 5 + 8), ("qwen2.5-vl-tiny", 64, 5),
                                                      ("qwen3-vl-tiny", 64, 4 * 5), ("internvl-tiny", 45, 5),
                                                      ("qwen3.5-tiny", 16, 5), ("gemma3-tiny", 16, 5)])
def test_hf_bench_features_site_on_packed_families(shape, placeholders, kept, capsys):
    """LLaVA-NeXT (a 64x64 image: the base tile's 16 tokens, 2 x 2 crops unpadded to 8 x 8 with a
    newline per row, the 8 newlines never reduced), Qwen2.5-VL (8 frames of 64 x 64: 4 x 8 x 8
    patches, 2 x 2 merged: one run), Qwen3-VL (the same video as its processor writes it: a run of
    16 per temporal patch, `tokens` kept in each) and InternVL (a 96x96 image: 2 x 2 tiles of 48 px
    and a thumbnail, 9 tokens each: one run): the prompt carries the model's own feature count, the
    features site keeps `tokens` per run inside the LLM, the tower's FLOPs stay and the LLM's fall."""
    pytest.importorskip("transformers")
    report = bench.main(["--hf", shape, "--device", "cpu", "--warmup", "0", "--runs", "1", "--batch-size", "2",
                         "--tokens", "5", "--no-progress"])
    assert report["site"] == "features" and report["image_placeholders"] == placeholders
    base, patched = report["results"]
    assert base["image_tokens"] == patched["image_tokens"] == placeholders
    assert patched["llm_kept"] == [kept]
    assert report["prompt_token_ratio"] == 1 and report["tower_flops_ratio"] == 1
    assert report["llm_flops_ratio"] < 1 and report["prefill_flops_ratio"] < 1
    printed = capsys.readouterr().out
    assert "at site features" in printed
    row = next(line.split() for line in printed.splitlines() if line.startswith("visual tokens after the features"))
    assert row[-3:] == [str(placeholders), str(kept), f"{kept / placeholders:.2f}x"]
    if shape.startswith("qwen3.5"):  # its linear-attention layers: LLM methods refused by name
        with pytest.raises(SystemExit):
            bench.main(["--hf", shape, "--device", "cpu", "--method", "fastv", "--keep", "0.5", "--no-progress"])
        assert "form no attention probabilities" in capsys.readouterr().err
        return
    fastv = bench.main(["--hf", shape, "--device", "cpu", "--warmup", "0", "--runs", "1", "--method", "fastv",
                        "--keep", "0.5", "--option", "k=1", "--no-progress"])
    assert fastv["site"] == "llm" and fastv["llm_flops_ratio"] < 1


@pytest.mark.parametrize("shape,placeholders,kept", [("qwen3-vl-tiny", 64, 32), ("internvl-tiny", 45, 22),
                                                      ("qwen3.5-tiny", 16, 8), ("gemma3-tiny", 16, 8)])
def test_hf_bench_keep_option_at_the_features_site_on_qwen3_vl_and_internvl(shape, placeholders, kept):
    """`--option keep=0.5` at the features site: half of each run (Qwen3-VL: 8 of each temporal
    patch's 16; InternVL: 22 of the image's 45) reaches the LLM's layers."""
    pytest.importorskip("transformers")
    report = bench.main(["--hf", shape, "--device", "cpu", "--warmup", "0", "--runs", "1", "--method", "tome",
                         "--site", "features", "--option", "keep=0.5", "--no-progress"])
    assert report["site"] == "features" and report["options"] == {"keep": 0.5}
    base, patched = report["results"]
    assert base["image_tokens"] == patched["image_tokens"] == placeholders and patched["llm_kept"] == [kept]
    assert report["llm_flops_ratio"] < 1


def test_hf_shapes_lay_out_qwen3_vl_and_internvl_prompts_as_their_processors():
    """The prompts of the Qwen3-VL and InternVL shapes, token by token, against the placeholder
    strings of the processors' own methods (text tokens as "t"; Qwen3-VL's "<t seconds>" as two),
    and InternVL's tile count against its image processor's on an image of the shape's size."""
    pytest.importorskip("transformers")
    import re
    from transformers import GotOcr2ImageProcessor
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from tome_plus.tools import hf_prompts, hf_shapes

    def bare(cls, **attrs):  # a processor holding only what its placeholder method reads
        obj = cls.__new__(cls)
        obj.__dict__.update(attrs)
        return obj

    def spelled(ids, names):
        return "".join(names.get(i, "t") for i in ids.tolist())

    model = hf_shapes.build_model("qwen3-vl-tiny")
    config = model.config
    data = hf_shapes.make_batch(model, "qwen3-vl-tiny", 2, 8)
    processor = bare(Qwen3VLProcessor, video_token="V", vision_start_token="S", vision_end_token="E",
                     video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2))
    metadata = [SimpleNamespace(fps=2.0, frames_indices=list(range(8)))]  # 8 frames sampled at 2 fps
    video = processor.replace_video_token({"video_grid_thw": data["video_grid_thw"], "video_metadata": metadata}, 0)
    expected = "tttt" + re.sub(r"<[0-9.]+ seconds>", "tt", video) + "tttt"
    names = {config.video_token_id: "V", config.vision_start_token_id: "S", config.vision_end_token_id: "E"}
    assert expected.count("S") == 4 and [spelled(row, names) for row in data["input_ids"]] == [expected] * 2
    assert torch.equal(data["mm_token_type_ids"], (data["input_ids"] == config.video_token_id).long() * 2)
    assert "second_per_grid_ts" not in data and data["video_grid_thw"].tolist() == [[4, 8, 8]] * 2

    model = hf_shapes.build_model("internvl-tiny")
    config = model.config
    data = hf_shapes.make_batch(model, "internvl-tiny", 2, 8)
    tiles = GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=12,
                                  size={"height": 48, "width": 48})(torch.rand(3, 96, 96))["num_patches"]
    processor = bare(InternVLProcessor, start_image_token="<", end_image_token=">", image_token="C",
                     image_seq_length=config.image_seq_length)
    expected = "tttt" + processor.replace_image_token({"num_patches": [int(tiles[0])]}, 0) + "tttt"
    names = {hf_prompts.INTERNVL_IMG_START: "<", hf_prompts.INTERNVL_IMG_END: ">", config.image_token_id: "C"}
    assert int(tiles[0]) == 5 and [spelled(row, names) for row in data["input_ids"]] == [expected] * 2
    assert data["pixel_values"].shape == (2 * 5, 3, 48, 48)


@pytest.mark.parametrize("argv,message", [
    (["--hf", "llava-next-tiny", "--tokens", "5", "--site", "tower"], "--site tower: LlavaNextForConditionalGeneration "
     "packs each image's tower grids"),
    (["--hf", "qwen3-vl-tiny", "--tokens", "5", "--site", "tower"], "--site tower: Qwen3VLForConditionalGeneration "
     "merges 2 x 2 patches after its tower"),
    (["--hf", "internvl-tiny", "--tokens", "5", "--site", "tower"], "--site tower: InternVLForConditionalGeneration "
     "tiles each image into its own number of crops plus a thumbnail"),
    (["--hf", "llava-small-shape", "--method", "atp", "--site", "features"],
     "--site features: method 'atp' prunes inside the language model: site='llm'"),
    (["--hf", "llava-tiny", "--method", "fastv", "--keep", "0.5", "--site", "tower"],
     "--site tower: method 'fastv' prunes inside the language model"),
    (["--hf", "llava-tiny", "--site", "llm"], "--site llm: method 'tome' reduces vision tokens"),
    # no --site: the model's default for the method, which LLaVA-NeXT's features site does not run
    (["--hf", "llava-next-tiny", "--method", "diffrate", "--option", "gflops=1"],
     "--method diffrate at its default site, features: site='features' runs divprune, pitome, tome, visionzip, zero_tprune"),
])
def test_hf_bench_site_refused_before_the_model_is_built(argv, message, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(bench, "run_hf_bench", lambda *a, **k: pytest.fail("refused before the model is built"))
    status, err = run_cli(["bench", "--device", "cpu", "--no-progress", *argv], capsys)
    assert status == 2 and err.startswith(f"tome-plus bench: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["--hf", "llava-huge"], "argument --hf: unknown shape 'llava-huge'; known shapes: llava-1.5-7b-shape, "),
    (["--hf", "llava-tiny", "--model", "vit_tiny_patch16_224"],
     "--model is read only with a timm model (--model), not with --hf SHAPE"),
    (["--hf", "llava-tiny", "--img-size", "64"], "--img-size is read only with a timm model (--model), not with --hf"),
    (["--hf", "llava-tiny", "--graphs"], "--graphs is read only with a timm model (--model) or --kernels, not with "
                                         "--hf SHAPE"),
    (["--hf", "llava-tiny", "--kernels"], "--kernels does not go with --hf"),
    (["--hf", "llava-tiny", "--precision", "half"], "--precision half needs --dtype float16 or bfloat16"),
    (["--hf", "llava-tiny", "--text-tokens", "0"], "argument --text-tokens: must be >= 1, got 0"),
    (["--hf", "llava-tiny", "--method", "nope"], "--method: unknown method 'nope'"),
])
def test_hf_bench_refuses_bad_values_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_hf_bench", lambda *a, **k: pytest.fail("refused values must stop before the run"))
    status, err = run_cli(["bench", "--device", "cpu", "--no-progress", *argv], capsys)
    assert status == 2
    assert err.startswith("tome-plus") and message in err and err.count("\n") == 1
    if "unknown shape" in message:
        assert "llava-small-shape" in err and "llava-tiny" in err


def test_hf_bench_without_transformers_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    status, err = run_cli([*HF_TINY, "--runs", "1"], capsys)
    assert status == 1 and err.startswith("tome-plus bench: error: --hf needs transformers")
    assert err.endswith('install it with pip install -e ".[hf]"\n') and err.count("\n") == 1


def test_timm_bench_never_imports_transformers():
    code = ("import sys; from tome_plus.tools.cli import main; "
            "main(['bench', '--model', 'vit_tiny_patch16_224', '--device', 'cpu', '--dtype', 'float32', "
            "'--img-size', '32', '--batch-size', '1', '--warmup', '0', '--runs', '1', '--r', '1', '--no-progress']); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)


@pytest.mark.parametrize("dtype,precision,label,weights", [
    ("float32", None, "fp32", torch.float32),
    ("bfloat16", None, "bf16 weights", torch.bfloat16),  # --hf: half weights unless autocast is asked for
    ("bfloat16", "autocast", "autocast bf16", torch.float32),
])
def test_hf_precision_defaults_to_half_weights(dtype, precision, label, weights):
    pytest.importorskip("transformers")
    from tome_plus.tools import hf_shapes
    prec = timing.resolve_hf_precision("cpu", dtype, precision)
    assert prec.label == label and prec.tensor_dtype == weights
    model = hf_shapes.build_llava("llava-tiny", dtype=prec.tensor_dtype)
    assert {p.dtype for p in model.parameters()} == {weights} and torch.get_default_dtype() == torch.float32
    ids, mask, pixels = hf_shapes.make_inputs(model.config, 1, 3, dtype=prec.tensor_dtype)
    # BOS, 2 text tokens (the "USER:" in front of the image), then the 64 placeholders
    assert ids.shape == (1, 3 + 64) and ids[0, 0] == 1 and bool((ids[0, 3:] == 199).all())
    assert bool((ids[0, 1:3] > 2).all()) and pixels.dtype == weights


def test_hf_bench_kv_compares_the_policy_with_the_full_cache(capsys):
    """--kv: a budget of the whole sequence agrees with the full cache token for token and holds as
    much; every=1 with a small budget holds that budget per layer, less memory."""
    pytest.importorskip("transformers")
    common = ["--hf", "llava-tiny", "--device", "cpu", "--kv", "a2sf", "--new-tokens", "12", "--no-progress"]
    same = bench.main([*common, "--kv-option", "budget=1.0", "--kv-option", "recent=2"])
    assert same["token_agreement"] == 1.0 and same["first_difference"] is None and same["kv_memory_ratio"] == 1.0
    small = bench.main([*common, "--kv-option", "budget=24", "--kv-option", "recent=4", "--kv-option", "every=1"])
    full, pruned = small["results"]
    assert pruned["cache_lengths"] == [24, 24] and full["cache_lengths"] == [96 + 11] * 2
    assert small["kv_memory_ratio"] == pytest.approx(24 / 107)
    printed = capsys.readouterr().out
    assert "decode tokens/s" in printed and "greedy tokens equal to the full cache's" in printed


@pytest.mark.parametrize("argv,message", [
    (["--kv", "a2sf"], "--kv measures a language model's decoding: give --hf SHAPE"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--r", "4"],
     "--r is read only with a timm model (--model) or --hf SHAPE, not with --hf SHAPE --kv"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--kv-option", "size=3"], "--kv-option: unknown kv_options ['size']"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--kv-option", "budgett=1"], "--kv-option: unknown kv_options ['budgett']"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--kv-option", "forget=2"],
     "--kv-option: forget must lie in (0, 1], got 2"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--kv-option", "budget"], "--kv-option takes KEY=VALUE, got 'budget'"),
])
def test_hf_bench_kv_refuses_bad_values(argv, message, capsys, monkeypatch):
    from tome_plus.tools import bench_kv
    monkeypatch.setattr(bench_kv, "run_kv_bench", lambda *a, **k: pytest.fail("refused before any model is built"))
    status, err = run_cli(["bench", "--device", "cpu", "--no-progress", *argv], capsys)
    assert status == 2 and err.startswith(f"tome-plus bench: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    # the timm bench
    (["--kv-option", "budget=64"], "--kv-option is read only with --hf SHAPE --kv, not with a timm model (--model)"),
    (["--new-tokens", "64"], "--new-tokens is read only with --hf SHAPE --kv, not with a timm model (--model)"),
    (["--site", "features"], "--site is read only with --hf SHAPE, not with a timm model (--model)"),
    (["--text-tokens", "8"], "--text-tokens is read only with --hf SHAPE or --hf SHAPE --kv, not with a timm model"),
    # --hf
    (["--hf", "llava-tiny", "--kv-option", "budget=64"], "--kv-option is read only with --hf SHAPE --kv, not with "
                                                         "--hf SHAPE"),
    (["--hf", "llava-tiny", "--new-tokens", "1024"], "--new-tokens is read only with --hf SHAPE --kv, not with "
                                                     "--hf SHAPE"),
    # --hf --kv: the policy alone, decoding without warm-up, JSON only
    (["--hf", "llava-tiny", "--kv", "a2sf", "--method", "tome"], "--method is read only with a timm model (--model) "
                                                                 "or --hf SHAPE, not with --hf SHAPE --kv"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--site", "llm"], "--site is read only with --hf SHAPE, not with "
                                                              "--hf SHAPE --kv"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--warmup", "1"], "--warmup is read only with a timm model (--model) "
                                                              "or --hf SHAPE, not with --hf SHAPE --kv"),
    (["--hf", "llava-tiny", "--kv", "a2sf", "--csv", "r.csv"], "--csv is read only with a timm model (--model) or "
                                                               "--hf SHAPE, not with --hf SHAPE --kv"),
    # --kernels: its own shapes, on CUDA
    (["--kernels", "--r", "16"], "--r is read only with a timm model (--model) or --hf SHAPE, not with --kernels"),
    (["--kernels", "--model", "vit_tiny_patch16_224"], "--model is read only with a timm model (--model), not with "
                                                       "--kernels"),
    (["--kernels", "--batch-size", "8"], "--batch-size is read only with a timm model (--model), --hf SHAPE or "
                                         "--hf SHAPE --kv, not with --kernels"),
    (["--kernels", "--device", "cpu"], "--device is read only with a timm model (--model), --hf SHAPE or "
                                       "--hf SHAPE --kv, not with --kernels"),
])
def test_bench_refuses_options_its_mode_does_not_read(argv, message, capsys, monkeypatch):
    """An option the chosen bench would ignore is refused (exit status 2, one line naming it and
    the mode that reads it), before any model is built: no other benchmark runs in its place."""
    from tome_plus.tools import bench_kv, kernel_bench
    for module, name in ((bench, "run_bench"), (bench_hf, "run_hf_bench"), (bench_kv, "run_kv_bench"),
                         (kernel_bench, "run")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("refused before any run"))
    status, err = run_cli(["bench", "--no-progress", *argv], capsys)
    assert status == 2 and err.startswith(f"tome-plus bench: error: {message}") and err.count("\n") == 1


def test_hf_table_shows_the_visual_tokens_after_each_site():
    """At the features and llm sites every image token enters the LLM: the reduction is after the
    site, a row of its own with the unpatched count, the kept count and their ratio."""
    from tome_plus.tools.report import hf_table
    row = dict(image_tokens=1008, prompt_tokens=1040, vision_images_per_s=10.0, vision_ms_per_batch=100.0,
               prefill_ms_per_batch=200.0, llm_ms_per_batch=90.0, tower_gflops_per_image=1.0,
               projector_gflops_per_image=0.5, llm_gflops_per_prompt=8.0, prefill_gflops_per_prompt=9.5,
               peak_mem_mib=100.0, tokens=[], llm_kept=[])
    report = dict(hf="llava-next-small-shape", description="d", method="tome", options={"keep": 0.25},
                  site="features", pruned_after=["the features site"], device_name="cpu", device="cpu",
                  precision="fp32", batch_size=1, text_tokens=32, image_placeholders=1008, runs=1, warmup=0,
                  vision_speedup=1.0, prefill_speedup=1.5, llm_speedup=1.8, tower_flops_ratio=1.0,
                  llm_flops_ratio=0.3, prefill_flops_ratio=0.4,
                  results=[dict(row, name="baseline"), dict(row, name="tome", llm_kept=[252.0])])
    lines = hf_table(report).splitlines()
    assert lines[3].split()[-3:] == ["1008", "1008", "1.00x"] and lines[3].startswith("image tokens into the LLM")
    assert lines[4].startswith("visual tokens after the features site") and lines[4].split()[-3:] == [
        "1008", "252", "0.25x"]
    fastv = dict(report, site="llm", pruned_after=["decoder layer 1", "decoder layer 7"],
                 results=[dict(row, name="baseline"), dict(row, name="fastv", llm_kept=[504.0, 126.5])])
    lines = hf_table(fastv).splitlines()
    assert [line.split()[-3:] for line in lines[4:6]] == [["1008", "504", "0.50x"], ["1008", "126.5", "0.13x"]]
    assert lines[4].startswith("visual tokens after decoder layer 1")
    assert lines[5].startswith("visual tokens after decoder layer 7")
