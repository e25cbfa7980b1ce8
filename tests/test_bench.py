"""`tome-plus bench` end to end on a small model, and the CPU peak-memory meter."""
import csv
import json
import subprocess
import sys

import torch

from tome_plus.tools.cli import main
from tome_plus.tools.common import PeakMemory


def test_peak_memory_counts_live_tensors():
    with PeakMemory() as mem:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # another MiB while a is alive
        del a, b
        c = torch.zeros(512, 256)  # half a MiB after both are gone
    assert mem.peak == 2 * 2**20
    del c
    assert mem.current == 0


def test_bench_cli_end_to_end(tmp_path, capsys):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    main(["bench", "--model", "vit_tiny_patch16_224", "--device", "cpu", "--dtype", "float32",
          "--batch-size", "2", "--warmup", "0", "--runs", "2", "--r", "8", "--no-progress",
          "--json", str(out_json), "--csv", str(out_csv)])
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "baseline" in printed
    report = json.loads(out_json.read_text())
    base, patched = report["results"]
    assert report["options"] == {"r": 8}
    assert patched["tokens"] == [197 - 8 * (i + 1) for i in range(12)]
    assert 0.3 < report["flops_ratio"] < 0.8
    assert base["gflops_per_image"] > 2.0  # ViT-Ti is ~2.5 GFLOPs with attention counted
    assert report["speedup"] == patched["images_per_s"] / base["images_per_s"]
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["name"] for r in rows] == ["baseline", "tome"]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "tome_plus.tools.cli", "bench", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--flops" in out and "--json" in out
