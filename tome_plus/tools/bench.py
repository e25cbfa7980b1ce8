"""`tome-plus bench`: the unpatched and the patched model, measured in one run.

Reports images/s, ms per batch, FLOPs per image (`torch.utils.flop_counter`, attention counted
on every device), peak activation memory and the tokens left after each layer. Timings of the two
models are interleaved run by run, so drift of the machine hits both alike.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

import tome_plus

from .common import DTYPES, PeakMemory, add_method_args, describe, method_options, save_json
from .flops import count_flops


@dataclass
class Measurement:
    name: str
    images_per_s: float
    ms_per_batch: float
    ms_per_batch_min: float
    gflops_per_image: float
    peak_mem_mib: float
    tokens: List[int] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _peak_memory_mib(model, x) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        model(x)
        torch.cuda.synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    with PeakMemory() as mem:
        model(x)
    return mem.peak / 2**20


def input_size(model, img_size: Optional[int]) -> Sequence[int]:
    if img_size:
        return (3, img_size, img_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def run_bench(model_name: str, method: str, options: Dict[str, Any], device: str = "cpu",
              dtype: str = "float32", batch_size: int = 8, warmup: int = 2, runs: int = 10,
              img_size: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
              progress: bool = True) -> Dict[str, Any]:
    """Benchmark `model_name` unpatched vs. patched with `method` and `options`; returns a dict."""
    import timm

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    dev = torch.device(device)
    torch_dtype = DTYPES[dtype]
    kwargs = dict(model_kwargs or {})
    if img_size:
        kwargs["img_size"] = img_size
    baseline = timm.create_model(model_name, pretrained=False, **kwargs).eval()
    baseline = baseline.to(dev, torch_dtype)
    patched = tome_plus.patch(copy.deepcopy(baseline), method, **options)

    x = torch.randn(batch_size, *input_size(baseline, img_size), device=dev, dtype=torch_dtype)
    one = x[:1]
    models = {"baseline": baseline, method: patched}
    times: Dict[str, List[float]] = {name: [] for name in models}
    bar = tqdm(total=(warmup + runs) * len(models), desc=f"bench {model_name}", disable=not progress,
               file=sys.stderr)
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, model in models.items():
                _sync(dev)
                start = time.perf_counter()
                model(x)
                _sync(dev)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
                bar.update(1)
    bar.close()

    results = []
    for name, model in models.items():
        med = statistics.median(times[name])
        tokens = list(tome_plus.inspect(model).tokens) if name != "baseline" else []
        results.append(Measurement(
            name=name, images_per_s=batch_size / med, ms_per_batch=med * 1e3,
            ms_per_batch_min=min(times[name]) * 1e3,
            gflops_per_image=count_flops(model, one) / 1e9,
            peak_mem_mib=_peak_memory_mib(model, x), tokens=tokens))
    base, red = results
    return {
        "model": model_name, "method": method, "options": options, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "dtype": dtype, "batch_size": batch_size, "warmup": warmup, "runs": runs,
        "input_size": list(x.shape[1:]), "torch": torch.__version__,
        "results": [asdict(r) for r in results],
        "speedup": red.images_per_s / base.images_per_s,
        "flops_ratio": red.gflops_per_image / base.gflops_per_image,
        "memory_ratio": red.peak_mem_mib / base.peak_mem_mib if base.peak_mem_mib else None,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


def format_table(report: Dict[str, Any]) -> str:
    lines = [f"{report['model']} | {describe(report['method'], report['options'])} | "
             f"{report['device_name']} ({report['device']}) {report['dtype']} | batch {report['batch_size']}, "
             f"{report['runs']} runs after {report['warmup']} warm-up",
             f"{'':<12}{'images/s':>12}{'ms/batch':>12}{'GFLOPs/img':>12}{'peak MiB':>12}"]
    for r in report["results"]:
        lines.append(f"{r['name']:<12}{r['images_per_s']:>12.1f}{r['ms_per_batch']:>12.2f}"
                     f"{r['gflops_per_image']:>12.2f}{r['peak_mem_mib']:>12.1f}")
    mem = report["memory_ratio"]
    lines.append(f"speed-up {report['speedup']:.2f}x | FLOPs {report['flops_ratio']:.2f}x"
                 + (f" | peak memory {mem:.2f}x" if mem else ""))
    tokens = report["results"][1]["tokens"]
    lines.append("tokens after each layer: " + " ".join(str(t) for t in tokens))
    return "\n".join(lines)


def write_csv(report: Dict[str, Any], path: str) -> None:
    keys = ["model", "method", "device_name", "dtype", "batch_size"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + ["name", "images_per_s", "ms_per_batch", "gflops_per_image",
                                "peak_mem_mib", "tokens"])
        for r in report["results"]:
            writer.writerow([report[k] for k in keys] + [
                r["name"], f"{r['images_per_s']:.3f}", f"{r['ms_per_batch']:.3f}",
                f"{r['gflops_per_image']:.4f}", f"{r['peak_mem_mib']:.2f}", " ".join(map(str, r["tokens"]))])


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="tome-plus bench", description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                        choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch (default 256 on CUDA, 8 on CPU)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10 on CUDA, 2 on CPU)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default 50 on CUDA, 10 on CPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    parser.add_argument("--csv", default=None, metavar="PATH", help="write the results as CSV")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--kernels", action="store_true",
                        help="instead: Triton kernels vs. PyTorch twins per op and end to end (CUDA only)")
    add_method_args(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    if args.kernels:
        from . import kernel_bench
        report = kernel_bench.run(dtype=args.dtype, runs=args.runs or 30)
        print(kernel_bench.format_report(report))
        save_json(report, args.json)
        return report
    cuda = args.device.startswith("cuda")
    report = run_bench(
        args.model, args.method, method_options(args), device=args.device, dtype=args.dtype,
        batch_size=args.batch_size or (256 if cuda else 8),
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 2),
        runs=args.runs if args.runs is not None else (50 if cuda else 10),
        img_size=args.img_size, progress=not args.no_progress)
    print(format_table(report))
    save_json(report, args.json)
    if args.csv:
        write_csv(report, args.csv)
    return report


if __name__ == "__main__":
    main()
