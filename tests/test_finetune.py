"""`tome-plus finetune` with the CLCA head or the linear head, resume, torchrun, and `tome-plus eval --finetuned`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tome_plus
from tome_plus.tools.cli import main
from tome_plus.tools.finetune import load_finetuned, main as finetune_main, read_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
CLASSES = ["a_class", "b_class", "c_class"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(4):
            img = np.clip(np.array([80 * c, 60, 200 - 70 * c]) + rng.integers(0, 50, size=(48, 48, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"img{i}.png")
    return root


def finetune(folder, out, *extra, steps=2):
    return finetune_main(["--model", "vit_tiny_patch16_224", "--data", str(folder), "--method", "tome",
                 "--budget", "r=8", "--steps", str(steps), "--batch-size", "4", "--workers", "0",
                 "--lr", "1e-3", "--out", str(out), "--no-progress", "--device", "cpu", *extra])


def test_frozen_clca_trains_the_head_alone_and_resumes(folder, tmp_path):
    out = tmp_path / "clca.pt"
    finetune(folder, out, "--head", "clca", "--freeze", "--save-every", "1")
    payload = read_checkpoint(str(out))
    assert payload["step"] == 2 and payload["head"] == "clca" and payload["frozen"]
    # with the backbone frozen, the checkpoint is the head: carrier and aggregation head only
    assert set(k.split(".")[0] for k in payload["weights"]) == {"carrier", "aggregate", "classifier"}
    model = load_finetuned(str(out))
    assert tome_plus.inspect(model).head == "clca" and tome_plus.heads.module(model).num_classes == 3
    # the frozen backbone is the one the run started from (seeded random init)
    torch.manual_seed(0)
    import timm
    start = timm.create_model("vit_tiny_patch16_224")
    assert torch.equal(model.blocks[5].mlp.fc1.weight, start.blocks[5].mlp.fc1.weight)
    # the head alone, as tome_plus.heads.save wrote it, loads into a fresh patch
    torch.manual_seed(0)
    other = timm.create_model("vit_tiny_patch16_224")
    tome_plus.patch(other, "tome", r=8, head="clca", head_options={"num_classes": 3, "weights": str(out) + ".head.pt"})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), model(x))
    history = finetune(folder, out, "--head", "clca", "--freeze", "--resume", steps=3)
    resumed = read_checkpoint(str(out))
    assert [r["step"] for r in history] == [3] and resumed["step"] == 3
    # the optimizer went on from its saved state (a fresh one would count 1 step)
    assert all(s["step"] == 3 for s in resumed["optimizer"]["state"].values())
    with pytest.raises(SystemExit) as e:  # other settings cannot resume this checkpoint
        finetune(folder, out, "--head", "clca", "--freeze", "--resume", "--head-option", "cache_gap=False", steps=4)
    assert e.value.code == 1


def test_linear_head_full_finetune_and_eval(folder, tmp_path):
    out = tmp_path / "linear.pt"
    finetune(folder, out, "--head", "linear")
    payload = read_checkpoint(str(out))
    assert not payload["frozen"] and "blocks.0.attn.qkv.weight" in payload["weights"]
    assert payload["weights"]["head.weight"].shape[0] == 3
    import timm
    torch.manual_seed(0)
    start = timm.create_model("vit_tiny_patch16_224")
    assert not torch.equal(payload["weights"]["blocks.0.attn.qkv.weight"], start.blocks[0].attn.qkv.weight)
    report = tmp_path / "eval.json"
    main(["eval", "--finetuned", str(out), "--data", str(folder), "--workers", "0", "--no-progress",
          "--json", str(report)])
    r = json.loads(report.read_text())
    assert r["images"] == 12 and r["method"] == "tome" and r["options"] == {"r": 8} and r["head"] == "linear"
    assert 0 <= r["top1"] <= 100 and r["flops_ratio"] < 0.8


def test_clca_checkpoint_evaluates_like_a_direct_loop(folder, tmp_path):
    out = tmp_path / "clca.pt"
    finetune(folder, out, "--head", "clca")
    report = tmp_path / "eval.json"
    main(["eval", "--finetuned", str(out), "--data", str(folder), "--workers", "0", "--no-progress",
          "--json", str(report)])
    r = json.loads(report.read_text())
    from timm.data import create_transform, resolve_data_config
    import timm
    # the model rebuilt by hand: same seeded backbone, method and head, the checkpoint's weights
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224")
    tome_plus.patch(model, "tome", r=8, head="clca", head_options={"num_classes": 3})
    model.load_state_dict(read_checkpoint(str(out))["weights"])
    model.eval()
    # the final norm and the model's own head, unused under CLCA, do not train; the blocks do
    torch.manual_seed(0)
    start = timm.create_model("vit_tiny_patch16_224")
    assert torch.equal(model.norm.weight, start.norm.weight) and torch.equal(model.head.weight, start.head.weight)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    hits = 0
    for c, name in enumerate(CLASSES):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as img, torch.no_grad():
                hits += int(model(transform(img.convert("RGB"))[None]).argmax()) == c
    assert r["head"] == "clca" and r["top1"] == pytest.approx(100.0 * hits / 12)


def test_torchrun_two_processes(folder, tmp_path):
    out = tmp_path / "ddp.pt"
    args = ["--model", "vit_tiny_patch16_224", "--data", str(folder), "--method", "tome", "--budget", "r=8",
            "--head", "clca", "--freeze", "--steps", "2", "--batch-size", "2", "--workers", "0", "--out", str(out),
            "--device", "cpu", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tome_plus.tools.finetune", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_checkpoint(str(out))["step"] == 2


def test_usage_errors(folder, tmp_path, capsys):
    bad = [(["--head", "linear", "--head-option", "expansion=3"], "--head-option"),
           (["--lr", "0"], "--lr"),
           (["--img-size", "112"], "--img-size")]
    for extra, word in bad:
        with pytest.raises(SystemExit) as e:
            finetune(folder, tmp_path / "x.pt", *extra)
        assert e.value.code == 2
        assert word in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # 12 images make no batch of 64: an error, not an endless wait
        finetune(folder, tmp_path / "x.pt", "--batch-size", "64")
    assert e.value.code == 1 and "no full batch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--finetuned", str(tmp_path / "x.pt"), "--model", "vit_tiny_patch16_224", "--data", str(folder)])
    assert e.value.code == 2
