"""`tome-plus bench --kernels` runs end to end (on CPU through the interpreter: a smoke test of the
script that a GPU run relies on; its timings mean nothing here)."""
import os

import pytest
import torch

from tome_plus.tools import bench, kernel_bench

from test_bench import fake_capture

TINY_MODEL = ("vit_tiny_patch16_224", {"r": 1}, 1, {"img_size": 64})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_kernel_bench_runs_and_reports_every_row():
    report = kernel_bench.run(dtype="float32", runs=1, shapes={"tiny": (2, 17, 64, 4)}, models=[TINY_MODEL])
    assert report["precision"] == "fp32" and report["graphs"] is None
    ops = [r["op"] for r in report["kernels"]]
    assert ops == ["match+merge r=8", "wpr 30 iters", "energy"]
    assert all(r["torch_ms"] > 0 and r["triton_ms"] > 0 for r in report["kernels"])
    attention = report["attention"]
    assert [r["layout"] for r in attention] == ["no mask", "[B,1,1,N] mask", "extra channel"]
    assert attention[0]["sdpa_vs_no_mask"] == 1.0 and attention[0]["qkv_sdpa_vs_no_mask"] == 1.0
    assert attention[1]["sdpa_vs_no_mask"] == pytest.approx(attention[1]["sdpa_ms"] / attention[0]["sdpa_ms"])
    # the extra channel gives the masked logits: same output (fp32)
    assert attention[2]["max_abs_diff_vs_mask"] < 1e-5 and attention[1]["max_abs_diff_vs_mask"] is None
    (row,) = report["end_to_end"]
    assert row["model"] == "vit_tiny_patch16_224" and row["triton_ms"] > 0
    assert row["speedup_triton"] == pytest.approx(row["baseline_ms"] / row["triton_ms"])
    assert row["triton_graph_ms"] is None and row["graph_speedup_triton"] is None and row["graph_errors"] == {}
    text = kernel_bench.format_report(report)
    assert "wpr 30 iters" in text and "extra channel" in text and "graphs n/a (CPU)" in text
    assert "vit_tiny_patch16_224" in text


def test_kernel_bench_end_to_end_graphs_share_the_bench_helper(monkeypatch):
    # the twins only (kernels forced to torch for both patched variants): this checks the graph
    # bookkeeping, not the kernels
    in_mode = kernel_bench.in_mode
    monkeypatch.setattr(kernel_bench, "in_mode", lambda mode, forward: in_mode("torch", forward))
    monkeypatch.setattr(bench, "capture_graph", fake_capture(failing=2, off_by=0.5))
    prec = bench.resolve_precision("cpu", "bfloat16")
    (row,) = kernel_bench.end_to_end_rows(prec, "cpu", [TINY_MODEL], runs=1, graphs=True)
    assert row["baseline_graph_ms"] > 0 and row["torch_graph_ms"] > 0 and row["triton_graph_ms"] is None
    assert row["graph_speedup_torch"] == pytest.approx(row["baseline_graph_ms"] / row["torch_graph_ms"])
    assert row["graph_speedup_triton"] is None
    diff = row["graph_max_abs_diff"]
    assert diff["baseline"] == 0.0 and diff["torch"] == pytest.approx(0.5, abs=0.02)  # bf16 rounding
    assert row["graph_errors"]["triton"].startswith("RuntimeError: capture invalidated (after RuntimeError: CUDA")
    assert list(row["graph_errors"]) == ["triton"]
    text = kernel_bench.format_report({"device": "cpu", "torch": torch.__version__, "dtype": "bfloat16",
                                       "precision": prec.label, "graphs": True, "kernels": [], "attention": [],
                                       "end_to_end": [row]})
    assert "end to end autocast bf16, graphs on" in text
    assert "triton: graph capture failed: RuntimeError" in text and "torch: graphed output differs" in text


def test_in_mode_sets_the_kernel_switch_for_the_call_only(monkeypatch):
    monkeypatch.setenv("TOME_PLUS_KERNELS", "auto")
    forward = kernel_bench.in_mode("triton", lambda x: os.environ["TOME_PLUS_KERNELS"] + x)
    assert forward("!") == "triton!" and os.environ["TOME_PLUS_KERNELS"] == "auto"
