"""`tome-plus bench --kernels` runs end to end (on CPU through the interpreter: a smoke test of the
script that a GPU run relies on; its timings mean nothing here)."""
import os

import pytest

from tome_plus.tools import kernel_bench


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_kernel_bench_runs_and_reports_every_row():
    report = kernel_bench.run(dtype="float32", runs=1, shapes={"tiny": (2, 17, 64, 4)},
                              models=[("vit_tiny_patch16_224", {"r": 4}, 2)])
    ops = [r["op"] for r in report["kernels"]]
    assert ops == ["match+merge r=8", "wpr 30 iters", "energy", "reference: one SDPA"]
    assert all(r["torch_ms"] > 0 for r in report["kernels"])
    (row,) = report["end_to_end"]
    assert row["model"] == "vit_tiny_patch16_224" and row["triton_ms"] > 0
    text = kernel_bench.format_report(report)
    assert "wpr 30 iters" in text and "vit_tiny_patch16_224" in text
