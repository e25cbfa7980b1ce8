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
from tome_plus.tools import bench
from tome_plus.tools.cli import main
from tome_plus.tools.common import PeakMemory

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
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))
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
    (["--graphs"], "--graphs needs a CUDA device (CUDA graphs); this run is on cpu"),
    (["--precision", "half"], "--precision half needs --dtype float16 or bfloat16"),
    (["--dtype", "float16", "--precision", "fast"], "argument --precision: invalid choice: 'fast'"),
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
    # a budget tome_plus.patch refuses (a tuple r is ToMe's (r, inflect)), and a model timm lacks
    status, err = run_cli(["bench", *TINY, "--img-size", "64", "--batch-size", "1", "--runs", "1",
                           "--budget", "r=(4,8,12)"], capsys)
    assert status == 1 and err.startswith("tome-plus bench: error: ") and err.count("\n") == 1
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
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    step = lambda: setattr(clock, "round", len(calls) // 2)  # noqa: E731
    times = bench.interleave({"a": fn("a", 1.0), "b": fn("b", 3.0)}, warmup=1, runs=2,
                             sync=lambda: syncs.append(1), step=step)
    assert calls == ["a", "b"] * 3  # round robin: a drift over time hits a and b alike
    assert times == {"a": [1.0, 1.0], "b": [3.0, 3.0]}  # warm-up round not kept
    assert len(syncs) == 2 * len(calls)  # before and after every call: queued GPU work is timed


def test_real_capture_failing_on_cpu_is_reported_and_eager_still_timed():
    # the real `capture_graph` (CPU tensors cannot be captured): the error is a result, not a crash
    calls = []
    timing = bench.time_forwards({"double": lambda x: calls.append(1) or x * 2}, torch.ones(3), warmup=1, runs=2,
                                 graphs=True)["double"]
    assert timing.graph is None and timing.graph_equal is None
    assert timing.graph_error.startswith("ValueError: ") and "cuda" in timing.graph_error
    assert len(timing.eager) == 2 and len(calls) == 3  # 1 warm-up + 2 timed, nothing else ran


def test_autocast_probe():
    assert bench.autocast_supported("cpu", torch.bfloat16)
    assert not bench.autocast_supported("cpu", torch.float32)  # torch disables it: refused, not run as fp32


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
    monkeypatch.setattr(bench, "autocast_supported", lambda device_type, dtype: False)
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
    """A stand-in for `bench.capture_graph` on CPU: replay reruns the forward on the captured
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
    monkeypatch.setattr(bench, "resolve_graphs", lambda device, graphs=None: True)
    monkeypatch.setattr(bench, "capture_graph", fake_capture(off_by=1.0))
    loops = []
    real = bench.interleave
    monkeypatch.setattr(bench, "interleave", lambda fns, *a, **k: loops.append(list(fns)) or real(fns, *a, **k))
    report = bench.run_bench("vit_tiny_patch16_224", "tome", {"r": 1}, img_size=64, batch_size=1, warmup=0,
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
    monkeypatch.setattr(bench, "resolve_graphs", lambda device, graphs=None: True)
    monkeypatch.setattr(bench, "capture_graph", fake_capture(failing=1))
    report = bench.run_bench("vit_tiny_patch16_224", "tome", {"r": 1}, img_size=64, batch_size=1, warmup=0,
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
