"""`tome-plus eval` on a real ImageFolder: one process against a direct loop (two processes: test_torchrun.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import tome_plus
from tome_plus.tools.cli import main
from tome_plus.tools.data import SafeImageFolder
from tome_plus.tools.measure import evaluate

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
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tome-plus eval: error: could not get pretrained weights") and "--checkpoint" in last


def test_link_loop_counts_each_image_once_under_its_real_class(tmp_path, capsys):
    root, expected = tmp_path / "val", {}
    for c, name in enumerate(["class_a", "class_b", "class_c"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            path = root / name / f"{i}.png"
            Image.fromarray(np.full((24, 24, 3), 50 * c + 9 * i, np.uint8)).save(path)
            expected[os.path.realpath(path)] = c
    (root / "class_a" / "loop").symlink_to("..")  # torchvision's ImageFolder lists 615 samples here
    (root / "class_c" / "b0.png").symlink_to(root / "class_b" / "0.png")  # class_b's image, linked
    outside = tmp_path / "elsewhere"  # a folder linked in from outside the split: the class it is linked into
    outside.mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(outside / "x.png")
    (root / "class_c" / "more").symlink_to(outside)
    expected[os.path.realpath(outside / "x.png")] = 2

    dataset = SafeImageFolder(str(root), transform=None)
    assert dataset.classes == ["class_a", "class_b", "class_c"]
    labels = {os.path.realpath(path): target for path, target in dataset.samples}
    assert len(dataset.samples) == len(labels) == 16 and labels == expected

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3).eval()
    ckpt, out = tmp_path / "tiny3.safetensors", tmp_path / "r.json"
    save_file(model.state_dict(), str(ckpt))
    main(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt), "--data", str(root),
          "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress", "--json", str(out)])
    err = capsys.readouterr().err
    assert "tome-plus eval: note: --data: 2 link(s)" in err and "class_a/loop" in err and "class_c/b0.png" in err
    result = json.loads(out.read_text())
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    with torch.no_grad():  # reference: every real file once, with the class folder it was written to
        logits = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in expected]))
    top1 = 100.0 * (logits.argmax(-1) == torch.tensor(list(expected.values()))).float().mean().item()
    assert (result["images"], result["repeated_links"]) == (16, 2)
    assert result["top1"] == pytest.approx(top1)


def run_cli(argv, capsys):
    """Exit status and stderr of `tome-plus ARGV`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_errors_are_one_line_with_exit_status(folder, checkpoint, tmp_path, capsys):
    base = ["eval", "--workers", "0", "--no-progress", "--device", "cpu"]
    tiny = [*base, "--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint)]
    two = tmp_path / "two"
    for name in CLASSES[:2]:
        (two / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(two / name / "a.png")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    pickled = tmp_path / "garbage.pth"
    pickled.write_bytes(b"not a pickle")
    failures = [  # exit 1: the command line is fine, the work fails
        ([*tiny, "--data", str(two)], "--data has 2 classes but the model head has 7"),
        ([*base, "--model", "vit_tiny_patch16_224", "--checkpoint", str(garbage), "--data", str(folder)],
         "could not be read as a timm, safetensors or torch checkpoint"),
        ([*base, "--model", "vit_tiny_patch16_224", "--checkpoint", str(pickled), "--data", str(folder)],
         "could not be read as a timm, safetensors or torch checkpoint"),
        ([*base, "--model", "vit_small_patch16_224", "--checkpoint", str(checkpoint), "--data", str(folder)],
         "does not fit vit_small_patch16_224: 151 tensor shape(s) differ"),  # all but head.bias (7,)
    ]
    for argv, message in failures:
        status, err = run_cli(argv, capsys)
        assert (status, err.count("\n")) == (1, 1), (argv, err)
        assert err.startswith("tome-plus eval: error: ") and message in err, err
    usage = [  # exit 2: refused before any work
        ([*tiny, "--data", str(tmp_path / "missing")], f"--data {str(tmp_path / 'missing')!r} is not a folder"),
        ([*base, "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(folder)],
         "--checkpoint"),
        ([*tiny, "--data", str(folder), "--r", "8"], "a budget or option needs --method"),
        ([*tiny, "--data", str(folder), "--method", "tome", "--r", "-1"], "r must be >= 0, got -1"),
        ([*tiny, "--data", str(folder), "--method", "tome", "--keep", "2"], "keep must lie in (0, 1], got 2"),
        ([*tiny, "--data", str(folder), "--method", "tome", "--budget", "r=abc"], "r must be an int"),
        ([*tiny, "--data", str(folder), "--method", "tome", "--option", "nope=1"], "unknown option(s) ['nope']"),
        ([*tiny, "--data", str(folder), "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        ([*tiny, "--data", str(folder), "--method", "tome", "--budget", "depth=3"], "--budget kind must be"),
    ]
    if not torch.cuda.is_available():
        usage.append(([*tiny[:-4], "--data", str(folder), "--device", "cuda"], "no CUDA GPU is available"))
    for argv, message in usage:
        status, err = run_cli(argv, capsys)
        assert (status, err.count("\n")) == (2, 1), (argv, err)
        assert err.startswith("tome-plus eval: error: ") and message in err, err


def test_a_resnet_checkpoint_evaluates_unpatched_and_is_refused_for_a_method(folder, tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=len(CLASSES)).eval()
    ckpt, out = tmp_path / "resnet.safetensors", tmp_path / "r.json"
    save_file(model.state_dict(), str(ckpt))
    base = ["eval", "--model", "resnet18", "--checkpoint", str(ckpt), "--data", str(folder), "--workers", "0",
            "--no-progress", "--device", "cpu"]
    status, err = run_cli([*base, "--method", "tome", "--r", "4"], capsys)
    assert (status, err.count("\n")) == (1, 1) and err.startswith("tome-plus eval: error: tome_plus cannot patch ResNet")
    main([*base, "--json", str(out)])  # its classifier is fc.weight: no method, no patching, evaluated
    result = json.loads(out.read_text())
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    hits = 0
    for c, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("img*.png")):
            with Image.open(path) as img, torch.no_grad():
                hits += int(model(transform(img.convert("RGB"))[None]).argmax()) == c
    assert (result["images"], result["skipped"]) == (21, 2) and result["top1"] == pytest.approx(100.0 * hits / 21)


def test_ctrl_c_says_how_far_it_got(folder, checkpoint, tmp_path, capsys, monkeypatch):
    from tome_plus.tools import measure as module  # where the evaluation loop runs

    def stop_after_one(iterable, **kwargs):
        for i, item in enumerate(iterable):
            if i == 1:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(module, "tqdm", stop_after_one)
    out = tmp_path / "r.json"
    status, err = run_cli(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--data",
                           str(folder), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--json", str(out)],
                          capsys)
    assert status == 130 and not out.exists()
    assert err == ("tome-plus eval: interrupted: stopped after 4 of 23 images; nothing was written (--json is "
                   "written at the end)\n")
