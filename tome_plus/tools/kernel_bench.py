"""`tome-plus bench --kernels`: Triton kernels vs. their PyTorch twins, and end to end, on CUDA.

Every ratio printed is measured in this one run on this one GPU:
- per kernel at the shapes of ViT-B/16, ViT-L/16 and CLIP-L/336 (LLaVA's vision tower), batch
  256 (64 for CLIP-L/336): match+merge (ToMe's step as the model runs it: the fused plan from the
  per-head keys, then the size-weighted merge), weighted PageRank (30 iterations), energy;
- attention at full length: SDPA without a mask, with proportional attention's additive
  `[B, 1, 1, N]` mask, and with its extra q/k channel (`tome_plus.prop_attn`), alone and with the
  qkv GEMM that feeds it;
- end to end, the unpatched timm model vs. the patched model with the PyTorch twins vs. with the
  Triton kernels, eager and replayed from a CUDA graph, and batch-1 latency.

    tome-plus bench --kernels --json kernels.json
"""
from __future__ import annotations

import copy
import os
import statistics
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from .common import UsageError
from .models import input_size
from .timing import Forward, Precision, resolve_graphs, resolve_precision, time_forwards, time_ms

SHAPES = {  # name: (batch, tokens, width, heads)
    "vit_b16": (256, 197, 768, 12),
    "vit_l16": (256, 197, 1024, 16),
    "clip_l336": (64, 577, 1024, 16),
}
END_TO_END = [  # model, budget, batch (optionally a 4th item: timm.create_model kwargs)
    ("vit_base_patch16_224", {"r": 16}, 256),
    ("deit_small_patch16_224", {"r": 13}, 256),
    ("vit_large_patch16_224", {"r": 8}, 256),
    ("vit_large_patch14_clip_336", {"r": 12}, 64),
    ("vit_large_patch14_clip_336", {"r": 8}, 64),
]
VARIANTS = ("baseline", "torch", "triton")  # end to end: unpatched, patched with twins, with Triton


@contextmanager
def kernels(mode: str) -> Iterator[None]:
    old = os.environ.get("TOME_PLUS_KERNELS")
    os.environ["TOME_PLUS_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOME_PLUS_KERNELS", None)
        else:
            os.environ["TOME_PLUS_KERNELS"] = old


def in_mode(mode: str, forward: Forward) -> Forward:
    """`forward` with `TOME_PLUS_KERNELS=mode` (read at each call, so also while a graph is captured)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with kernels(mode):
            return forward(x)
    return run


def _label(name: str, shape: tuple) -> str:
    batch, n, width, heads = shape
    return f"{name} B{batch} N{n} C{width} H{heads}"


def kernel_rows(dtype: torch.dtype, device: str, shapes: Dict[str, tuple], runs: int) -> List[Dict[str, Any]]:
    from ..merging import merge_wavg
    from ..methods.tome import bipartite_plan
    from ..triton_kernels.energy import energy_score
    from ..triton_kernels.pagerank import weighted_pagerank

    rows = []
    for name, (batch, n, width, heads) in shapes.items():
        head_dim = width // heads
        x = torch.randn(batch, n, width, device=device, dtype=dtype)
        # per-head keys as attention hands them over: a strided view into the qkv output
        keys = torch.randn(batch, n, 3, heads, head_dim, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)[1]
        metric = torch.randn(batch, n, head_dim, device=device, dtype=dtype)
        size = torch.rand(batch, n, 1, device=device) + 1
        attn = torch.randn(batch, heads, n, n, device=device, dtype=dtype).softmax(-1)
        r = min(16 if n < 300 else 12, (n - 1) // 2)

        def match_merge():
            plan = bipartite_plan(keys, r, 1)
            return merge_wavg(plan, x, size, head_dim ** 0.5)  # log_scale 1 / scale: prop_attn's channel

        cases = {
            f"match+merge r={r}": match_merge,
            "wpr 30 iters": lambda: weighted_pagerank(attn, 30),
            "energy": lambda: energy_score(metric[:, 1:], 0.5),
        }
        for case, fn in cases.items():
            timings = {}
            for mode in ("torch", "triton"):
                with kernels(mode):
                    timings[mode] = time_ms(fn, warmup=min(10, runs), runs=runs)
            rows.append({"shape": _label(name, (batch, n, width, heads)), "op": case,
                         "torch_ms": timings["torch"], "triton_ms": timings["triton"],
                         "speedup": timings["torch"] / timings["triton"]})
    return rows


@torch.no_grad()
def attention_rows(dtype: torch.dtype, device: str, shapes: Dict[str, tuple], runs: int) -> List[Dict[str, Any]]:
    """Proportional attention's cost at full length: the additive mask vs. the extra q/k channel,
    each against SDPA without a mask; SDPA alone and with the qkv GEMM that writes its inputs."""
    from ..prop_attn import pad_qkv, split_padded, write_size_channel

    rows = []
    for name, (batch, n, width, heads) in shapes.items():
        head_dim = width // heads
        scale = head_dim ** -0.5
        x = torch.randn(batch, n, width, device=device, dtype=dtype)
        weight = torch.randn(3 * width, width, device=device, dtype=dtype) * width ** -0.5
        bias = torch.randn(3 * width, device=device, dtype=dtype) * 0.02
        padded_weight, padded_bias = pad_qkv(weight, bias, heads, head_dim)  # once, as the patched model caches it
        log_size = torch.rand(batch, n, device=device) * 3  # merged groups of 1 to 20 tokens
        mask = log_size[:, None, None, :].to(dtype)

        def plain_qkv():
            qkv = F.linear(x, weight, bias).view(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)

        def padded_qkv():
            q, k, v = split_padded(F.linear(x, padded_weight, padded_bias), heads, head_dim)
            write_size_channel(k, head_dim, log_size / scale)
            return q, k, v

        plain, padded = plain_qkv(), padded_qkv()
        layouts = {  # name: (SDPA alone, qkv GEMM + SDPA)
            "no mask": (lambda: F.scaled_dot_product_attention(*plain),
                        lambda: F.scaled_dot_product_attention(*plain_qkv())),
            "[B,1,1,N] mask": (lambda: F.scaled_dot_product_attention(*plain, attn_mask=mask),
                               lambda: F.scaled_dot_product_attention(*plain_qkv(), attn_mask=mask)),
            "extra channel": (lambda: F.scaled_dot_product_attention(*padded, scale=scale),
                              lambda: F.scaled_dot_product_attention(*padded_qkv(), scale=scale)),
        }
        diff = (layouts["extra channel"][0]().float() - layouts["[B,1,1,N] mask"][0]().float()).abs().max().item()
        first: Dict[str, float] = {}
        for layout, (sdpa, with_qkv) in layouts.items():
            t_sdpa = time_ms(sdpa, warmup=min(10, runs), runs=runs)
            t_qkv = time_ms(with_qkv, warmup=min(10, runs), runs=runs)
            first = first or {"sdpa": t_sdpa, "qkv": t_qkv}
            rows.append({"shape": _label(name, (batch, n, width, heads)), "layout": layout,
                         "sdpa_ms": t_sdpa, "sdpa_vs_no_mask": t_sdpa / first["sdpa"],
                         "qkv_sdpa_ms": t_qkv, "qkv_sdpa_vs_no_mask": t_qkv / first["qkv"],
                         "max_abs_diff_vs_mask": diff if layout == "extra channel" else None})
    return rows


def end_to_end_rows(precision: Precision, device: str, models: List[tuple], runs: int,
                    graphs: bool) -> List[Dict[str, Any]]:
    import timm

    import tome_plus

    rows = []
    for model_name, budget, batch, *kwargs in models:  # optional 4th item: timm.create_model kwargs
        model_kwargs = kwargs[0] if kwargs else {}
        base = timm.create_model(model_name, pretrained=False, **model_kwargs).eval()
        base = base.to(device, precision.tensor_dtype)
        patched = tome_plus.patch(copy.deepcopy(base), "tome", **budget)
        forwards = {"baseline": precision.forward(base),
                    "torch": in_mode("torch", precision.forward(patched)),
                    "triton": in_mode("triton", precision.forward(patched))}
        size = input_size(base, model_kwargs.get("img_size"))
        for b in (batch, 1) if model_name == "vit_base_patch16_224" else (batch,):
            x = torch.randn(b, *size, device=device, dtype=precision.tensor_dtype)
            timing = time_forwards(forwards, x, warmup=min(10, runs), runs=runs, graphs=graphs)
            ms = {v: statistics.median(timing[v].eager) * 1e3 for v in VARIANTS}
            gms = {v: statistics.median(timing[v].graph) * 1e3 if timing[v].graph else None for v in VARIANTS}
            row: Dict[str, Any] = {"model": model_name, "budget": budget, "batch": b}
            for v in VARIANTS:
                row[f"{v}_ms"], row[f"{v}_graph_ms"] = ms[v], gms[v]
            for v in VARIANTS[1:]:
                row[f"speedup_{v}"] = ms["baseline"] / ms[v]
                row[f"graph_speedup_{v}"] = gms["baseline"] / gms[v] if gms["baseline"] and gms[v] else None
            row["graph_max_abs_diff"] = {v: timing[v].graph_max_abs_diff for v in VARIANTS}
            row["graph_errors"] = {v: timing[v].graph_error for v in VARIANTS if timing[v].graph_error}
            rows.append(row)
        del base, patched, forwards
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(dtype: str = "float16", runs: int = 30, shapes: Optional[Dict[str, tuple]] = None,
        models: Optional[List[tuple]] = None, precision: Optional[str] = None,
        graphs: Optional[bool] = None) -> Dict[str, Any]:
    """The whole report. Kernel and attention rows take tensors in `dtype`; the end-to-end models
    run in `precision` (see `tome-plus bench`), with CUDA-graph timings unless `graphs=False`.
    On CPU it only runs under the Triton interpreter (a smoke test of this script; interpreter
    timings say nothing about speed, and there are no graphs)."""
    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, name = "cpu", "cpu (Triton interpreter: timings are meaningless)"
    else:
        raise UsageError("--kernels needs a CUDA GPU (the Triton kernels run on CPU only "
                         "in the interpreter, which says nothing about speed)")
    prec = resolve_precision(device, dtype, precision)
    use_graphs = resolve_graphs(device, graphs)
    shapes = shapes or SHAPES
    return {"device": name, "torch": torch.__version__, "dtype": dtype, "precision": prec.label,
            "graphs": use_graphs,
            "kernels": kernel_rows(prec.dtype, device, shapes, runs),
            "attention": attention_rows(prec.dtype, device, shapes, runs),
            "end_to_end": end_to_end_rows(prec, device, models or END_TO_END, runs, bool(use_graphs))}
