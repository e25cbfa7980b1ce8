"""`tome-plus bench --kernels`: Triton kernels vs. their PyTorch twins, and end to end, on CUDA.

Every ratio printed is measured in this one run on this one GPU:
- per kernel at the shapes of ViT-B/16, ViT-L/16 and CLIP-L/336 (LLaVA's vision tower), batch
  256 (64 for CLIP-L/336): match+merge (ToMe step), weighted PageRank (30 iterations), energy;
- end to end, images/s of the unpatched timm model vs. the patched model with the PyTorch twins
  vs. with the Triton kernels, and batch-1 latency.

    tome-plus bench --kernels --json kernels.json
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

import torch

SHAPES = {  # name: (batch, tokens, width, heads)
    "vit_b16": (256, 197, 768, 12),
    "vit_l16": (256, 197, 1024, 16),
    "clip_l336": (64, 577, 1024, 16),
}
END_TO_END = [  # model, budget, batch
    ("vit_base_patch16_224", {"r": 16}, 256),
    ("deit_small_patch16_224", {"r": 13}, 256),
    ("vit_large_patch16_224", {"r": 8}, 256),
    ("vit_large_patch14_clip_336", {"r": 12}, 64),
    ("vit_large_patch14_clip_336", {"r": 8}, 64),
]


@contextmanager
def kernels(mode: str):
    old = os.environ.get("TOME_PLUS_KERNELS")
    os.environ["TOME_PLUS_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOME_PLUS_KERNELS", None)
        else:
            os.environ["TOME_PLUS_KERNELS"] = old


def time_ms(fn: Callable[[], Any], warmup: int = 10, runs: int = 50) -> float:
    """Median milliseconds of `fn` (CUDA events on a GPU, wall clock otherwise)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_rows(dtype: torch.dtype, device: str, shapes: Dict[str, tuple], runs: int) -> List[Dict[str, Any]]:
    from ..merging import Plan, merge_wavg
    from ..methods.tome import bipartite_plan
    from ..triton_kernels.energy import energy_score
    from ..triton_kernels.pagerank import weighted_pagerank

    rows = []
    for name, (batch, n, width, heads) in shapes.items():
        x = torch.randn(batch, n, width, device=device, dtype=dtype)
        keys = torch.randn(batch, n, width // heads, device=device, dtype=dtype)
        size = torch.rand(batch, n, 1, device=device) + 1
        attn = torch.randn(batch, heads, n, n, device=device, dtype=dtype).softmax(-1)
        r = min(16 if n < 300 else 12, (n - 1) // 2)

        def match_merge():
            plan = bipartite_plan(keys, r, 1)
            return merge_wavg(plan, x, size)

        cases = {
            f"match+merge r={r}": match_merge,
            "wpr 30 iters": lambda: weighted_pagerank(attn, 30),
            "energy": lambda: energy_score(keys[:, 1:], 0.5),
        }
        for case, fn in cases.items():
            timings = {}
            for mode in ("torch", "triton"):
                with kernels(mode):
                    timings[mode] = time_ms(fn, warmup=min(10, runs), runs=runs)
            rows.append({"shape": f"{name} B{batch} N{n} C{width} H{heads}", "op": case,
                         "torch_ms": timings["torch"], "triton_ms": timings["triton"],
                         "speedup": timings["torch"] / timings["triton"]})
        attention = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            x.view(batch, n, heads, -1).transpose(1, 2), x.view(batch, n, heads, -1).transpose(1, 2),
            x.view(batch, n, heads, -1).transpose(1, 2)), warmup=min(10, runs), runs=runs)
        rows.append({"shape": f"{name} B{batch} N{n} C{width} H{heads}", "op": "reference: one SDPA",
                     "torch_ms": attention, "triton_ms": None, "speedup": None})
    return rows


@torch.no_grad()
def end_to_end_rows(dtype: torch.dtype, device: str, models: List[tuple], runs: int) -> List[Dict[str, Any]]:
    import timm

    import tome_plus

    rows = []
    for model_name, budget, batch in models:
        base = timm.create_model(model_name, pretrained=False).eval().to(device, dtype)
        patched = tome_plus.patch(copy.deepcopy(base), "tome", **budget)
        size = base.pretrained_cfg.get("input_size", (3, 224, 224))
        for b in (batch, 1) if model_name == "vit_base_patch16_224" else (batch,):
            x = torch.randn(b, *size, device=device, dtype=dtype)
            warm = min(10, runs)
            t_base = time_ms(lambda: base(x), warm, runs)
            with kernels("torch"):
                t_torch = time_ms(lambda: patched(x), warm, runs)
            with kernels("triton"):
                t_triton = time_ms(lambda: patched(x), warm, runs)
            rows.append({"model": model_name, "budget": budget, "batch": b, "baseline_ms": t_base,
                         "torch_ms": t_torch, "triton_ms": t_triton,
                         "speedup_torch": t_base / t_torch, "speedup_triton": t_base / t_triton})
        del base, patched
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(dtype: str = "float16", runs: int = 30, shapes: Optional[Dict[str, tuple]] = None,
        models: Optional[List[tuple]] = None) -> Dict[str, Any]:
    """The whole report. On CPU it only runs under the Triton interpreter (a smoke test of this
    script; interpreter timings say nothing about speed)."""
    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, name = "cpu", "cpu (Triton interpreter: timings are meaningless)"
    else:
        raise SystemExit("tome-plus bench --kernels needs a CUDA GPU (the Triton kernels run on CPU only "
                         "in the interpreter, which says nothing about speed)")
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    return {"device": name, "torch": torch.__version__, "dtype": dtype,
            "kernels": kernel_rows(torch_dtype, device, shapes or SHAPES, runs),
            "end_to_end": end_to_end_rows(torch_dtype, device, models or END_TO_END, runs)}


def format_report(report: Dict[str, Any]) -> str:
    lines = [f"{report['device']} | torch {report['torch']} | {report['dtype']}", "",
             f"{'shape':<34}{'op':<22}{'torch ms':>10}{'triton ms':>11}{'speed-up':>10}"]
    for r in report["kernels"]:
        tri = f"{r['triton_ms']:>11.3f}" if r["triton_ms"] is not None else f"{'':>11}"
        spd = f"{r['speedup']:>9.1f}x" if r["speedup"] is not None else ""
        lines.append(f"{r['shape']:<34}{r['op']:<22}{r['torch_ms']:>10.3f}{tri}{spd}")
    lines += ["", f"{'model':<30}{'budget':<10}{'batch':>6}{'base ms':>10}{'torch ms':>10}{'triton ms':>11}"
                  f"{'x torch':>9}{'x triton':>10}"]
    for r in report["end_to_end"]:
        budget = ",".join(f"{k}={v}" for k, v in r["budget"].items())
        lines.append(f"{r['model']:<30}{budget:<10}{r['batch']:>6}{r['baseline_ms']:>10.2f}{r['torch_ms']:>10.2f}"
                     f"{r['triton_ms']:>11.2f}{r['speedup_torch']:>8.2f}x{r['speedup_triton']:>9.2f}x")
    return "\n".join(lines)
