"""`tome-plus eval` on a real ImageFolder: one process, torchrun with two (gloo), a direct loop."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import tome_plus
from tome_plus.tools.cli import main
from tome_plus.tools.eval import evaluate

CLASSES = [f"n0{i}_class" for i in range(7)]  # 7 classes: top-5 is not trivially 100%
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(3):
            h, w = rng.integers(40, 90, size=2)
            base = np.zeros((h, w, 3), np.uint8) + np.array([30 * c, 40, 200 - 25 * c], np.uint8)
            img = np.clip(base + rng.integers(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"img{i}.png")
    # a truncated JPEG and a file that is no image at all: skipped and counted
    Image.fromarray(np.full((64, 64, 3), 127, np.uint8)).save(root / CLASSES[0] / "cut.jpg", quality=90)
    data = (root / CLASSES[0] / "cut.jpg").read_bytes()
    (root / CLASSES[0] / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / CLASSES[1] / "junk.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=len(CLASSES))
    path = tmp_path_factory.mktemp("ckpt") / "tiny3.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def direct_loop(checkpoint, folder, r):
    """Top-1/top-5 by hand: each readable image, in order, through the same model and transforms."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=len(CLASSES))
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(checkpoint)))
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    tome_plus.patch(model, "tome", r=r)
    hit1 = hit5 = n = skipped = 0
    for c, name in enumerate(CLASSES):
        for path in sorted((folder / name).iterdir()):
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
            except OSError:
                skipped += 1
                continue
            with torch.no_grad():
                logits = model(transform(img)[None])[0]
            top = logits.topk(5).indices.tolist()
            hit1 += top[0] == c
            hit5 += c in top
            n += 1
    return 100.0 * hit1 / n, 100.0 * hit5 / n, n, skipped


def test_one_process_two_processes_and_direct_loop_agree(folder, checkpoint, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # --budget r=8: torchrun's argparse takes a bare --r for an ambiguous abbreviation of its own options
    args = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--data", str(folder),
            "--method", "tome", "--budget", "r=8", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--no-progress"]
    main(["eval", *args, "--json", str(one)])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tome_plus.tools.eval", *args, "--json", str(two)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    for key in ("top1", "top5", "images", "skipped", "gflops_per_image", "flops_ratio"):
        assert r1[key] == r2[key], key
    assert r1["images"] == 21 and r1["skipped"] == 2
    top1, top5, n, skipped = direct_loop(checkpoint, folder, r=8)
    assert (r1["top1"], r1["top5"], r1["images"], r1["skipped"]) == (pytest.approx(top1), pytest.approx(top5), n, skipped)
    assert r1["flops_ratio"] < 0.8 and r1["method"] == "tome" and r1["options"] == {"r": 8}


def test_clear_errors_before_work(folder, checkpoint, tmp_path):
    common = dict(model_name="vit_tiny_patch16_224", checkpoint=str(checkpoint), workers=0, progress=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        evaluate(data=str(tmp_path / "missing"), **common)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        evaluate(data=str(tmp_path / "empty"), **common)
    two = tmp_path / "two"
    for name in CLASSES[:2]:
        (two / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(two / name / "a.png")
    with pytest.raises(ValueError, match="2 classes but the model head has 7"):
        evaluate(data=str(two), **common)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(data=str(folder), method="nope", **common)


def test_pretrained_without_hub_is_a_clear_error(folder):
    proc = subprocess.run([sys.executable, "-m", "tome_plus.tools.eval", "--model", "vit_tiny_patch16_224",
                           "--pretrained", "--data", str(folder), "--workers", "0", "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "could not get pretrained weights" in proc.stderr and "--checkpoint" in proc.stderr
