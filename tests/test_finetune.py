"""`tome-plus finetune` with the CLCA head or the linear head, resume, torchrun, and `tome-plus eval --finetuned`."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tome_plus
from tome_plus.tools.cli import main
from tome_plus.tools.finetune import main as finetune_main, read_checkpoint
from tome_plus.tools.models import load_finetuned

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


def direct_top1(model, folder):
    """Top-1 (%) of `model` over the folder's images, one at a time through timm's eval transforms."""
    from timm.data import create_transform, resolve_data_config
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    hits = n = 0
    for c, name in enumerate(CLASSES):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as img, torch.no_grad():
                hits += int(model(transform(img.convert("RGB"))[None]).argmax()) == c
            n += 1
    return 100.0 * hits / n


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
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:  # other settings cannot resume this checkpoint
        finetune(folder, out, "--head", "clca", "--freeze", "--resume", "--head-option", "cache_gap=False", steps=4)
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # nor can a run without --resume replace it
        finetune(folder, out, "--head", "clca", "--freeze", steps=4)
    assert e.value.code == 2 and out.read_bytes() == before


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
    assert r["flops_ratio"] < 0.8
    # the model rebuilt by hand: the seeded backbone with a 3-class head, ToMe r=8, the checkpoint's weights
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224")
    model.reset_classifier(3)
    tome_plus.patch(model, "tome", r=8)
    model.load_state_dict(payload["weights"])
    assert r["top1"] == pytest.approx(direct_top1(model.eval(), folder))


def test_clca_checkpoint_evaluates_like_a_direct_loop(folder, tmp_path):
    out = tmp_path / "clca.pt"
    finetune(folder, out, "--head", "clca")
    report = tmp_path / "eval.json"
    main(["eval", "--finetuned", str(out), "--data", str(folder), "--workers", "0", "--no-progress",
          "--json", str(report)])
    r = json.loads(report.read_text())
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
    assert r["head"] == "clca" and r["top1"] == pytest.approx(direct_top1(model, folder))


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
    with pytest.raises(SystemExit) as e:  # missing --data: refused before any work, as in eval
        finetune(tmp_path / "missing", tmp_path / "x.pt")
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
    for budget, message in ((["--r", "-1"], "r must be >= 0, got -1"), (["--keep", "2"], "keep must lie in (0, 1]"),
                            (["--budget", "r=abc"], "r must be an int")):
        with pytest.raises(SystemExit) as e:
            finetune_main(["--model", "vit_tiny_patch16_224", "--data", str(folder), "--method", "tome", *budget,
                           "--out", str(tmp_path / "x.pt"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.pt").exists()


def test_batch_size_one(folder, tmp_path, capsys):
    # the CLCA head's BatchNorm cannot train on one image: refused at once, not an endless wait
    with pytest.raises(SystemExit) as e:
        finetune(folder, tmp_path / "clca.pt", "--head", "clca", "--batch-size", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch-size 1: the CLCA head's BatchNorm needs at least 2" in err
    # the linear head has no BatchNorm: one image per step trains
    history = finetune(folder, tmp_path / "linear.pt", "--head", "linear", "--freeze", "--batch-size", "1", steps=3)
    assert [r["step"] for r in history] == [1, 2, 3] and read_checkpoint(str(tmp_path / "linear.pt"))["step"] == 3


def test_overwrite_and_resume_need_asking(folder, tmp_path, capsys):
    out = tmp_path / "c.pt"
    with pytest.raises(SystemExit) as e:  # nothing to resume
        finetune(folder, out, "--head", "linear", "--freeze", "--resume")
    assert e.value.code == 2 and "--resume: there is no checkpoint at --out" in capsys.readouterr().err
    finetune(folder, out, "--head", "linear", "--freeze", steps=3)
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:
        finetune(folder, out, "--head", "linear", "--freeze", steps=2)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "already exists; pass --resume to continue it or --overwrite to replace it" in err
    assert out.read_bytes() == before
    with pytest.raises(SystemExit) as e:
        finetune(folder, out, "--head", "linear", "--freeze", "--resume", "--overwrite")
    assert e.value.code == 2 and out.read_bytes() == before
    history = finetune(folder, out, "--head", "linear", "--freeze", "--overwrite", steps=2)
    assert [r["step"] for r in history] == [1, 2] and read_checkpoint(str(out))["step"] == 2
    # a finished run resumed: nothing to do, said so
    assert finetune(folder, out, "--head", "linear", "--freeze", "--resume", steps=2) == []
    assert "already holds step 2 of --steps 2: nothing to do" in capsys.readouterr().err


def interrupt_at(monkeypatch, step):
    """Ctrl-C as the training loop starts step `step` (0-based), where it sets the learning rate."""
    from tome_plus.tools import finetune as module
    real = module._lr_factor

    def lr_factor(s, *args):
        if s == step:
            raise KeyboardInterrupt
        return real(s, *args)
    monkeypatch.setattr(module, "_lr_factor", lr_factor)


def test_ctrl_c_says_where_it_stopped_and_the_checkpoint_resumes(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "c.pt"
    interrupt_at(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model", "vit_tiny_patch16_224", "--data", str(folder), "--method", "tome", "--budget",
              "r=8", "--head", "linear", "--freeze",
              "--steps", "5", "--save-every", "2", "--batch-size", "4", "--workers", "0", "--out", str(out),
              "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 130
    assert err == (f"tome-plus finetune: interrupted: stopped after step 3 of 5; {out} holds step 2: run the same "
                   "command with --resume to continue from there\n")
    saved = read_checkpoint(str(out))
    assert saved["step"] == 2 and [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    monkeypatch.undo()
    history = finetune(folder, out, "--head", "linear", "--freeze", "--resume", steps=5)
    assert [r["step"] for r in history] == [3, 4, 5]
    # before the first checkpoint: nothing was written, and the line says so
    interrupt_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as e:
        finetune(folder, tmp_path / "d.pt", "--head", "linear", "--freeze", steps=5)
    assert e.value.code == 130 and not (tmp_path / "d.pt").exists()
    assert capsys.readouterr().err == ("tome-plus finetune: interrupted: stopped after step 1 of 5, before the first "
                                       "checkpoint (every --save-every 100 steps): nothing was written\n")


def test_ctrl_c_while_saving_keeps_the_last_checkpoint(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "c.pt"
    real, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: Ctrl-C halfway through writing it
            with open(path, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
        return real(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        finetune(folder, out, "--head", "linear", "--freeze", "--save-every", "1", steps=3)
    assert e.value.code == 130
    assert "stopped after step 2 of 3" in capsys.readouterr().err
    monkeypatch.undo()
    assert read_checkpoint(str(out))["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_unreadable_images_are_skipped_and_counted(folder, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    (root / CLASSES[0] / "junk.png").write_bytes(b"not a png")
    (root / CLASSES[2] / "cut.png").write_bytes((root / CLASSES[2] / "img0.png").read_bytes()[:60])
    # one batch of all 14 files per pass: 12 train, 2 are skipped (and counted) each pass
    history = finetune(root, tmp_path / "c.pt", "--head", "linear", "--freeze", "--batch-size", "14", steps=2)
    assert [r["skipped"] for r in history] == [2, 4]
    assert "(4 unreadable image(s) skipped)" in capsys.readouterr().out
    # a pass with no batch of 2 readable images for the CLCA head: an error, not an endless loop
    bad = tmp_path / "bad"
    for name, files in (("a", ["good.png", "x.png"]), ("b", ["y.png", "z.png"])):
        (bad / name).mkdir(parents=True)
        for f in files:
            (bad / name / f).write_bytes(b"not a png")
    shutil.copy(folder / CLASSES[0] / "img0.png", bad / "a" / "good.png")
    with pytest.raises(SystemExit) as e:
        finetune(bad, tmp_path / "d.pt", "--head", "clca", "--freeze", "--batch-size", "4")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "a whole pass gave no batch of at least 2 readable image(s)" in err


def test_clca_quality_example_creates_its_output_folder_first(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "clca_quality", os.path.join(os.path.dirname(__file__), "..", "examples", "clca_quality.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "new" / "dir" / "x.json"
    ran = []

    def cli(*args):  # the tools stand in: eval writes its report where asked
        args = list(map(str, args))
        ran.append(args[0])
        assert out.parent.is_dir()  # made before any tool ran
        if args[0] == "eval":
            report = args[args.index("--json") + 1]
            with open(report, "w") as f:
                json.dump({"top1": 50.0, "gflops_per_image": 1.0, "flops_ratio": 0.5}, f)
    monkeypatch.setattr(example, "cli", cli)
    monkeypatch.setattr(sys, "argv", ["clca_quality.py", "--keeps", "0.5", "--heads", "linear", "--no-baseline",
                                      "--out", str(out)])
    example.main()
    assert ran == ["finetune", "eval"]
    assert json.loads(out.read_text())["rows"] == [{"keep": 0.5, "head": "linear", "top1": 50.0, "gflops": 1.0,
                                                    "flops_ratio": 0.5}]
    monkeypatch.setattr(sys, "argv", ["clca_quality.py", "--out", str(tmp_path / "new")])  # a folder: refused at once
    with pytest.raises(SystemExit) as e:
        example.main()
    assert e.value.code == 2 and ran == ["finetune", "eval"]
