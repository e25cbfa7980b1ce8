"""`tome-plus bench --kernels` runs end to end (on CPU through the interpreter: a smoke test of the
script that a GPU run relies on; its timings mean nothing here)."""
import os

import pytest
import torch

from tome_plus.tools import kernel_bench, timing
from tome_plus.tools.report import kernels_table

from test_bench import fake_capture

TINY_MODEL = ("vit_tiny_patch16_224", {"r": 1}, 1, {"img_size": 64})


def feed_interleave(monkeypatch, seconds):
    """`timing.interleave` (the end-to-end timer) runs each forward once and reports `seconds`,
    keyed by (variant, "eager" or "graph"), as the times of its calls."""
    real = timing.interleave

    def fed(fns, warmup, runs, *args, **kwargs):
        return {key: list(seconds[key]) for key in real(fns, 0, 1, *args, **kwargs)}

    monkeypatch.setattr(timing, "interleave", fed)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_kernel_bench_runs_and_reports_every_row(monkeypatch):
    # Every kernel, attention layout and model runs (a smoke test), but the timings are fed in here,
    # so each ratio of the report is checked against one worked out by hand.
    fed_ms = iter([6.0, 2.0, 9.0, 3.0, 1.0, 4.0,  # torch, triton: match+merge, wpr, energy
                   2.0, 4.0, 3.0, 10.0, 2.5, 5.0])  # SDPA alone, qkv+SDPA: no mask, mask, channel
    modes = []

    def fed_time_ms(fn, warmup=10, runs=50):
        fn()
        modes.append(os.environ.get("TOME_PLUS_KERNELS"))
        return next(fed_ms)

    monkeypatch.setattr(kernel_bench, "time_ms", fed_time_ms)
    feed_interleave(monkeypatch, {("baseline", "eager"): [0.012, 0.030, 0.011],  # medians 12, 8 and 5 ms
                                  ("torch", "eager"): [0.008, 0.009, 0.002],
                                  ("triton", "eager"): [0.005, 0.004, 0.009]})
    report = kernel_bench.run(dtype="float32", runs=3, shapes={"tiny": (2, 17, 64, 4)}, models=[TINY_MODEL])
    assert next(fed_ms, None) is None  # every timing was taken, none more
    assert report["precision"] == "fp32" and report["graphs"] is None
    assert modes[:6] == ["torch", "triton"] * 3  # each column timed with its own kernels
    kernels = report["kernels"]
    assert [r["op"] for r in kernels] == ["match+merge r=8", "wpr 30 iters", "energy"]
    assert [(r["torch_ms"], r["triton_ms"]) for r in kernels] == [(6.0, 2.0), (9.0, 3.0), (1.0, 4.0)]
    assert [r["speedup"] for r in kernels] == pytest.approx([3.0, 3.0, 0.25])  # torch / triton
    attention = report["attention"]
    assert [r["layout"] for r in attention] == ["no mask", "[B,1,1,N] mask", "extra channel"]
    assert [r["sdpa_ms"] for r in attention] == [2.0, 3.0, 2.5]
    assert [r["sdpa_vs_no_mask"] for r in attention] == pytest.approx([1.0, 1.5, 1.25])
    assert [r["qkv_sdpa_ms"] for r in attention] == [4.0, 10.0, 5.0]
    assert [r["qkv_sdpa_vs_no_mask"] for r in attention] == pytest.approx([1.0, 2.5, 1.25])
    # the extra channel gives the masked logits: same output (fp32)
    assert attention[2]["max_abs_diff_vs_mask"] < 1e-5 and attention[1]["max_abs_diff_vs_mask"] is None
    (row,) = report["end_to_end"]
    assert row["model"] == "vit_tiny_patch16_224"
    assert (row["baseline_ms"], row["torch_ms"], row["triton_ms"]) == pytest.approx((12.0, 8.0, 5.0))
    assert (row["speedup_torch"], row["speedup_triton"]) == pytest.approx((1.5, 2.4))  # baseline / patched
    assert row["triton_graph_ms"] is None and row["graph_speedup_triton"] is None and row["graph_errors"] == {}
    text = kernels_table(report)
    assert "wpr 30 iters" in text and "extra channel" in text and "graphs n/a (CPU)" in text
    lines = text.splitlines()
    line = lambda *words: next(l for l in lines if all(w in l for w in words)).split("  (")[0].split()
    assert line("energy")[-1] == "0.2x" and line("match+merge")[-1] == "3.0x"
    assert line("extra channel")[-3:] == ["1.25x", "5.000", "1.25x"]
    assert line("mask", "[B,1,1,N]")[-3:] == ["1.50x", "10.000", "2.50x"]
    assert line("vit_tiny_patch16_224", "eager")[-2:] == ["1.50x", "2.40x"]


def test_kernel_bench_end_to_end_graphs_share_the_bench_helper(monkeypatch):
    # the twins only (kernels forced to torch for both patched variants): this checks the graph
    # bookkeeping, not the kernels
    in_mode = kernel_bench.in_mode
    monkeypatch.setattr(kernel_bench, "in_mode", lambda mode, forward: in_mode("torch", forward))
    monkeypatch.setattr(timing, "capture_graph", fake_capture(failing=2, off_by=0.5))
    feed_interleave(monkeypatch, {("baseline", "eager"): [0.010], ("torch", "eager"): [0.008],
                                  ("triton", "eager"): [0.005], ("baseline", "graph"): [0.004],
                                  ("torch", "graph"): [0.001]})  # triton's capture fails: no replay to time
    prec = timing.resolve_precision("cpu", "bfloat16")
    (row,) = kernel_bench.end_to_end_rows(prec, "cpu", [TINY_MODEL], runs=1, graphs=True)
    assert (row["baseline_graph_ms"], row["torch_graph_ms"]) == pytest.approx((4.0, 1.0))
    assert row["triton_graph_ms"] is None
    assert (row["speedup_torch"], row["speedup_triton"]) == pytest.approx((1.25, 2.0))
    assert row["graph_speedup_torch"] == pytest.approx(4.0) and row["graph_speedup_triton"] is None
    diff = row["graph_max_abs_diff"]
    assert diff["baseline"] == 0.0 and diff["torch"] == pytest.approx(0.5, abs=0.02)  # bf16 rounding
    assert row["graph_errors"]["triton"].startswith("RuntimeError: capture invalidated (after RuntimeError: CUDA")
    assert list(row["graph_errors"]) == ["triton"]
    text = kernels_table({"device": "cpu", "torch": torch.__version__, "dtype": "bfloat16",
                                       "precision": prec.label, "graphs": True, "kernels": [], "attention": [],
                                       "end_to_end": [row]})
    assert "end to end autocast bf16, graphs on" in text
    assert "triton: graph capture failed: RuntimeError" in text and "torch: graphed output differs" in text


def test_in_mode_sets_the_kernel_switch_for_the_call_only(monkeypatch):
    monkeypatch.setenv("TOME_PLUS_KERNELS", "auto")
    forward = kernel_bench.in_mode("triton", lambda x: os.environ["TOME_PLUS_KERNELS"] + x)
    assert forward("!") == "triton!" and os.environ["TOME_PLUS_KERNELS"] == "auto"
