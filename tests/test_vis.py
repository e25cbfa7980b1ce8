"""Token visualisation: group fills, borders, pruned patches, any patch size, batches, the CLI."""
import numpy as np
import pytest
import torch
from PIL import Image

import tome_plus
from tome_plus.vis import make_visualization

from conftest import make


def check_drawing(img, source, patch, n_prefix, dim=0.3):
    """Independent check: every patch interior carries its group's mean colour (or the dimmed
    image when pruned), and borders separate different groups only."""
    vis = np.asarray(make_visualization(img, source, patch, n_prefix=n_prefix, dim=dim)).astype(float)
    pixels = np.asarray(img).astype(float)
    gh, gw = pixels.shape[0] // patch, pixels.shape[1] // patch
    cols = source[:, n_prefix:]
    for t in range(gh * gw):
        i, j = divmod(t, gw)
        interior = (slice(i * patch + 1, (i + 1) * patch - 1), slice(j * patch + 1, (j + 1) * patch - 1))
        if cols[:, t].sum() == 0:
            np.testing.assert_allclose(vis[interior], np.round(pixels[interior] * dim), atol=1)
            continue
        holder = int(cols[:, t].argmax())
        members = [u for u in range(gh * gw) if cols[holder, u] > 0]
        colour = np.mean([pixels[(u // gw) * patch:(u // gw + 1) * patch, (u % gw) * patch:(u % gw + 1) * patch]
                          .reshape(-1, 3) for u in members], axis=(0, 1))
        np.testing.assert_allclose(vis[interior].reshape(-1, 3), np.broadcast_to(colour, (len(vis[interior].reshape(-1, 3)), 3)), atol=1)
        if j + 1 < gw:  # a border runs between this patch and its right neighbour iff they differ
            right_holder = int(cols[:, t + 1].argmax()) if cols[:, t + 1].sum() else -1
            border = (vis[i * patch + patch // 2, (j + 1) * patch] == 255).all()
            assert border == (right_holder != holder)
    return vis


@pytest.mark.parametrize("model_name,patch", [("vit_tiny_patch16_224", 16), ("vit_small_patch14_dinov2", 14)])
def test_model_source_drawn_faithfully(model_name, patch):
    kwargs = {"img_size": 112} if "dinov2" in model_name else {"img_size": 128}
    model = make(model_name, **kwargs)
    size = kwargs["img_size"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    tome_plus.patch(model, "tome", r=6, trace_source=True)
    with torch.no_grad():
        model(x)
    source = tome_plus.inspect(model).source
    for b in range(2):
        check_drawing(Image.fromarray(images[b]), source[b], patch, model.num_prefix_tokens)
    batch = make_visualization(x, source, patch)  # a batch gives a list
    assert len(batch) == 2 and batch[0].size == (size, size)
    np.testing.assert_allclose(np.asarray(batch[1]).astype(int),
                               np.asarray(make_visualization(images[1], source[1], patch)).astype(int), atol=1)


def test_pruned_patches_are_dimmed():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8))
    # 2x3 grid, one prefix token; token 1 holds patches 0 and 1, token 2 holds patch 5, the rest pruned
    source = torch.zeros(3, 7)
    source[0, 0] = 1
    source[1, 1] = source[1, 2] = 1
    source[2, 6] = 1
    check_drawing(img, source, 16, n_prefix=1)


def test_bad_grid_is_clear_error():
    with pytest.raises(ValueError, match="grid"):
        make_visualization(np.zeros((32, 32, 3), np.uint8), torch.ones(2, 9), 16, n_prefix=0)


def test_cli_on_a_real_photo_with_real_weights(tmp_path, monkeypatch):
    from tome_plus.tools import focus_dinov2
    try:
        focus_dinov2.onnx_path()
        __import__("onnx")
    except (FileNotFoundError, ImportError):
        pytest.skip(focus_dinov2.INSTALL_HINT)
    skimage_data = pytest.importorskip("skimage.data")
    monkeypatch.setenv("TOME_PLUS_CACHE", str(tmp_path / "cache"))
    photo, out = tmp_path / "chelsea.png", tmp_path / "groups.png"
    Image.fromarray(skimage_data.chelsea()).save(photo)
    from tome_plus.tools.cli import main
    main(["vis", "--image", str(photo), "--out", str(out), "--r", "16", "--img-size", "224", "--with-original"])
    drawn = Image.open(out)
    assert drawn.size == (448, 224)
    right = np.asarray(drawn)[:, 224:]
    # 257 - 12 * 16 = 65 tokens left: 64 patch groups, so many flat regions with white borders between
    assert (right == 255).all(-1).mean() > 0.02
    assert len(np.unique(right.reshape(-1, 3), axis=0)) < 200


def test_cli_refuses_a_model_that_is_not_a_vit_in_one_line(tmp_path, capsys):
    from tome_plus.tools.cli import main
    photo = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photo)
    with pytest.raises(SystemExit) as exit_info:
        main(["vis", "--image", str(photo), "--out", str(tmp_path / "out.png"), "--model", "resnet18"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("tome-plus vis: error: tome_plus cannot patch ResNet") and err.count("\n") == 1
    assert not (tmp_path / "out.png").exists()


def test_cli_timm_vit_at_its_own_img_size(tmp_path):
    from tome_plus.tools.cli import main
    photo, out = tmp_path / "in.png", tmp_path / "new" / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(photo)
    main(["vis", "--image", str(photo), "--out", str(out), "--model", "vit_tiny_patch16_224", "--img-size", "64",
          "--r", "1"])
    assert Image.open(out).size == (64, 64)  # a 4 x 4 grid of 16 px patches, the model built for 64 px


def test_cli_refuses_an_output_without_an_image_extension_before_the_run(tmp_path, capsys, monkeypatch):
    from tome_plus.tools import vis
    from tome_plus.tools.cli import main
    photo = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photo)
    monkeypatch.setattr(vis, "visualize", lambda *a, **k: pytest.fail("refused before the run"))
    for out, message in (("noext", "no file extension"), ("x.abc", "PIL cannot write '.abc' images")):
        with pytest.raises(SystemExit) as exit_info:
            main(["vis", "--image", str(photo), "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"tome-plus vis: error: --out {tmp_path / out}: {message}"), err
    with pytest.raises(SystemExit) as exit_info:  # a missing image, and a budget no method takes
        main(["vis", "--image", str(tmp_path / "none.png"), "--out", str(tmp_path / "o.png")])
    assert exit_info.value.code == 2 and "--image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["vis", "--image", str(photo), "--out", str(tmp_path / "o.png"), "--r", "-1"])
    assert exit_info.value.code == 2 and "r must be >= 0, got -1" in capsys.readouterr().err


def test_cli_refuses_a_resnet_checkpoint_as_unpatchable(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file
    from tome_plus.tools.cli import main
    photo, ckpt = tmp_path / "in.png", tmp_path / "resnet.safetensors"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photo)
    save_file(timm.create_model("resnet18", num_classes=5).state_dict(), str(ckpt))
    with pytest.raises(SystemExit) as exit_info:
        main(["vis", "--image", str(photo), "--out", str(tmp_path / "out.png"), "--model", "resnet18",
              "--checkpoint", str(ckpt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("tome-plus vis: error: tome_plus cannot patch ResNet"), err
