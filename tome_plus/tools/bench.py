"""`tome-plus bench`: the unpatched and the patched model, measured in one run.

Reports images/s, ms per batch, FLOPs per image (`torch.utils.flop_counter`, attention counted
on every device), peak activation memory and the tokens left after each layer. On CUDA each model
is also captured whole in a CUDA graph and timed by replay (the patched forward never syncs with
the host, so capture works); the graphed output is checked against eager. All timings are
interleaved run by run, so drift of the machine hits every model alike.

Precision: `--dtype float32` runs in fp32. For float16/bfloat16, `--precision autocast` (the
default) keeps fp32 weights and inputs and runs the forward under `torch.autocast`;
`--precision half` casts weights and inputs to the dtype.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Dict, Hashable, List, Optional, Sequence, Tuple, TypeVar

import torch
from tqdm.auto import tqdm

import tome_plus

from .common import (DTYPES, Parser, PeakMemory, UsageError, add_method_args, check_device, check_method,
                     cli_errors, describe, int_at_least, method_options, prepare_output, save_json)
from .flops import count_flops

PROG = "tome-plus bench"
PRECISIONS = ("autocast", "half")
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
Forward = Callable[[torch.Tensor], torch.Tensor]
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Precision:
    """How a forward runs: `mode` None (fp32), "half" (weights and inputs in `dtype`) or "autocast"
    (fp32 weights and inputs, forward under `torch.autocast(device_type, dtype)`)."""

    dtype: torch.dtype
    mode: Optional[str]
    device_type: str

    @property
    def label(self) -> str:
        if self.mode == "half":
            return f"{SHORT[self.dtype]} weights"
        return f"autocast {SHORT[self.dtype]}" if self.mode == "autocast" else "fp32"

    @property
    def tensor_dtype(self) -> torch.dtype:
        """dtype of the weights and the input."""
        return self.dtype if self.mode == "half" else torch.float32

    def context(self) -> ContextManager:
        if self.mode != "autocast":
            return nullcontext()
        # No cache of cast weights (torch.cuda.make_graphed_callables requires the same): cached
        # casts made outside a capture, freed when the context exits, must not be read by the
        # graph. Each forward enters its own context, so eager loses nothing by it.
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)

    def forward(self, model: torch.nn.Module) -> Forward:
        """`model` as an inference call in this precision."""
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.context():
                return model(x)
        return run


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch runs autocast to `dtype` on `device_type` (it disables itself, with a
    warning, where it does not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype=dtype):
            return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype


def resolve_precision(device: str, dtype: str, precision: Optional[str] = None) -> Precision:
    """Check `--dtype`/`--precision` for `device` (usage errors) and pick the default: autocast."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}; expected one of {list(PRECISIONS)}")
    torch_dtype, device_type = DTYPES[dtype], torch.device(device).type
    if torch_dtype == torch.float32:
        if precision is not None:
            raise UsageError(f"--precision {precision} needs --dtype float16 or bfloat16 (float32 runs in fp32)")
        return Precision(torch_dtype, None, device_type)
    mode = precision or "autocast"
    if mode == "autocast" and not autocast_supported(device_type, torch_dtype):
        raise UsageError(f"--precision autocast: this torch has no {device_type} autocast to {dtype}; "
                         f"use --precision half or another --dtype")
    return Precision(torch_dtype, mode, device_type)


def resolve_graphs(device: str, graphs: Optional[bool] = None) -> Optional[bool]:
    """CUDA graph timings: on by default on CUDA; None (not applicable) elsewhere."""
    if torch.device(device).type == "cuda":
        return True if graphs is None else graphs
    if graphs:
        raise UsageError(f"--graphs needs a CUDA device (CUDA graphs); this run is on {device}")
    return None


def interleave(fns: Dict[K, Callable[[], Any]], warmup: int, runs: int,
               sync: Callable[[], None] = lambda: None, step: Callable[[], None] = lambda: None
               ) -> Dict[K, List[float]]:
    """Seconds per call of every fn. Round i calls each fn once, in order, so drift of the machine
    (clocks, heat, other load) hits all alike; the first `warmup` rounds are not kept."""
    times: Dict[K, List[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            step()
    return times


def capture_graph(forward: Forward, x: torch.Tensor, warmup: int = 3) -> Callable[[], torch.Tensor]:
    """`forward(x)` captured in a CUDA graph; returns a replay call that gives the static output
    (overwritten by the next replay)."""
    static_x = x.clone()
    with torch.cuda.device(x.device):
        # Warm-up on a side stream, as capture wants: lazy inits (cuBLAS handles, Triton compiles)
        # must not happen inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                forward(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = forward(static_x)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out
    return replay


@dataclass
class Timing:
    """Seconds per call, eager and graphed (None: graphs off, or capture failed: see `graph_error`)."""

    eager: List[float]
    graph: Optional[List[float]] = None
    graph_max_abs_diff: Optional[float] = None  # graphed output vs. eager, same input
    graph_equal: Optional[bool] = None
    graph_error: Optional[str] = None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    # an error inside the capture often surfaces as a second one when the capture ends: keep the first
    first = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return f"{line} (after {_one_line(first)})" if first is not None else line


def time_forwards(forwards: Dict[str, Forward], x: torch.Tensor, warmup: int, runs: int, graphs: bool,
                  progress: Optional[tqdm] = None) -> Dict[str, Timing]:
    """Eager timings of every forward on `x` and, with `graphs`, CUDA-graph replay timings, all
    interleaved. A capture that fails is reported in its `Timing`, and the run goes on."""
    timing = {name: Timing(eager=[]) for name in forwards}
    replays: Dict[str, Callable[[], torch.Tensor]] = {}
    if graphs:
        for name, forward in forwards.items():
            # Any error (capture refuses host syncs, CPU tensors, ...) is a finding to report.
            try:
                replay = capture_graph(forward, x)
                eager, graphed = forward(x).float(), replay().float()
                timing[name].graph_equal = torch.equal(eager, graphed)
                timing[name].graph_max_abs_diff = (eager - graphed).abs().max().item()
                replays[name] = replay
            except Exception as e:  # noqa: BLE001
                timing[name].graph_error = _one_line(e)
    fns: Dict[Tuple[str, str], Callable[[], Any]] = {(name, "eager"): (lambda f=f: f(x))
                                                     for name, f in forwards.items()}
    fns.update({(name, "graph"): replay for name, replay in replays.items()})
    if progress is not None:
        progress.total = (warmup + runs) * len(fns)
        progress.refresh()
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)
    times = interleave(fns, warmup, runs, sync=sync, step=(progress.update if progress is not None else lambda: None))
    for (name, kind), seconds in times.items():
        setattr(timing[name], kind, seconds)
    return timing


@dataclass
class Measurement:
    name: str
    images_per_s: float
    ms_per_batch: float
    ms_per_batch_min: float
    gflops_per_image: float
    peak_mem_mib: float
    tokens: List[int] = field(default_factory=list)
    graph_images_per_s: Optional[float] = None
    graph_ms_per_batch: Optional[float] = None
    graph_ms_per_batch_min: Optional[float] = None
    graph_max_abs_diff: Optional[float] = None
    graph_equal: Optional[bool] = None
    graph_error: Optional[str] = None


def _peak_memory_mib(forward: Forward, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        forward(x)
        torch.cuda.synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    with PeakMemory() as mem:
        forward(x)
    return mem.peak / 2**20


def input_size(model, img_size: Optional[int]) -> Sequence[int]:
    if img_size:
        return (3, img_size, img_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def run_bench(model_name: str, method: str, options: Dict[str, Any], device: str = "cpu",
              dtype: str = "float32", batch_size: int = 8, warmup: int = 2, runs: int = 10,
              img_size: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
              progress: bool = True, precision: Optional[str] = None,
              graphs: Optional[bool] = None) -> Dict[str, Any]:
    """Benchmark `model_name` unpatched vs. patched with `method` and `options`; returns a dict.

    `precision`: "autocast" (default for float16/bfloat16) or "half"; `graphs`: CUDA-graph timings
    too (default on CUDA; refused elsewhere).
    """
    import timm

    prec = resolve_precision(device, dtype, precision)
    use_graphs = resolve_graphs(device, graphs)
    dev = torch.device(device)
    kwargs = dict(model_kwargs or {})
    if img_size:
        kwargs["img_size"] = img_size
    baseline = timm.create_model(model_name, pretrained=False, **kwargs).eval()
    baseline = baseline.to(dev, prec.tensor_dtype)
    patched = tome_plus.patch(copy.deepcopy(baseline), method, **options)

    x = torch.randn(batch_size, *input_size(baseline, img_size), device=dev, dtype=prec.tensor_dtype)
    models = {"baseline": baseline, method: patched}
    forwards = {name: prec.forward(model) for name, model in models.items()}
    with tqdm(desc=f"bench {model_name}", disable=not progress, file=sys.stderr) as bar:
        timings = time_forwards(forwards, x, warmup, runs, bool(use_graphs), progress=bar)

    results = []
    for name, model in models.items():
        t = timings[name]
        med = statistics.median(t.eager)
        gmed = statistics.median(t.graph) if t.graph else None
        with prec.context():  # every forward in the chosen precision, the counted one too
            flops = count_flops(model, x[:1])
        results.append(Measurement(
            name=name, images_per_s=batch_size / med, ms_per_batch=med * 1e3,
            ms_per_batch_min=min(t.eager) * 1e3, gflops_per_image=flops / 1e9,
            peak_mem_mib=_peak_memory_mib(forwards[name], x),
            tokens=list(tome_plus.inspect(model).tokens) if name != "baseline" else [],
            graph_images_per_s=batch_size / gmed if gmed is not None else None,
            graph_ms_per_batch=gmed * 1e3 if gmed is not None else None,
            graph_ms_per_batch_min=min(t.graph) * 1e3 if t.graph else None,
            graph_max_abs_diff=t.graph_max_abs_diff, graph_equal=t.graph_equal, graph_error=t.graph_error))
    base, red = results
    return {
        "model": model_name, "method": method, "options": options, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "dtype": dtype, "precision": prec.label, "graphs": use_graphs,
        "batch_size": batch_size, "warmup": warmup, "runs": runs,
        "input_size": list(x.shape[1:]), "torch": torch.__version__,
        "results": [asdict(r) for r in results],
        "speedup": red.images_per_s / base.images_per_s,
        "graph_speedup": (red.graph_images_per_s / base.graph_images_per_s
                          if red.graph_images_per_s and base.graph_images_per_s else None),
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


def graph_summary(report: Dict[str, Any]) -> str:
    """One line on the CUDA graphs: not applicable, off, or per model equal / differs / failed."""
    if report["graphs"] is None:
        return f"graphs: n/a ({report['device'].split(':')[0].upper()})"
    if not report["graphs"]:
        return "graphs: off (--no-graphs)"
    parts = []
    for r in report["results"]:
        if r["graph_error"]:
            parts.append(f"{r['name']} capture failed: {r['graph_error']}")
        elif r["graph_equal"]:
            parts.append(f"{r['name']} equals eager")
        else:
            parts.append(f"{r['name']} differs from eager by up to {r['graph_max_abs_diff']:.3g}")
    return "graphs: " + "; ".join(parts)


def format_table(report: Dict[str, Any]) -> str:
    graphs = bool(report["graphs"])
    lines = [f"{report['model']} | {describe(report['method'], report['options'])} | "
             f"{report['device_name']} ({report['device']}) {report['precision']} | batch {report['batch_size']}, "
             f"{report['runs']} runs after {report['warmup']} warm-up",
             f"{'':<12}{'images/s':>12}{'ms/batch':>12}" + (f"{'graph img/s':>13}{'graph ms':>10}" if graphs else "")
             + f"{'GFLOPs/img':>12}{'peak MiB':>12}"]
    for r in report["results"]:
        graph = ""
        if graphs:
            graph = (f"{r['graph_images_per_s']:>13.1f}{r['graph_ms_per_batch']:>10.2f}"
                     if r["graph_ms_per_batch"] is not None else f"{'failed':>13}{'':>10}")
        lines.append(f"{r['name']:<12}{r['images_per_s']:>12.1f}{r['ms_per_batch']:>12.2f}{graph}"
                     f"{r['gflops_per_image']:>12.2f}{r['peak_mem_mib']:>12.1f}")
    mem, graphed = report["memory_ratio"], report["graph_speedup"]
    lines.append(f"speed-up {report['speedup']:.2f}x eager" + (f", {graphed:.2f}x graphed" if graphed else "")
                 + f" | FLOPs {report['flops_ratio']:.2f}x" + (f" | peak memory {mem:.2f}x" if mem else ""))
    lines.append(graph_summary(report))
    tokens = report["results"][1]["tokens"]
    lines.append("tokens after each layer: " + " ".join(str(t) for t in tokens))
    return "\n".join(lines)


def write_csv(report: Dict[str, Any], path: str) -> None:
    keys = ["model", "method", "device_name", "dtype", "precision", "batch_size"]
    columns = ["name", "images_per_s", "ms_per_batch", "graph_images_per_s", "graph_ms_per_batch",
               "gflops_per_image", "peak_mem_mib", "tokens", "graph_error"]
    fmt = {"images_per_s": ".3f", "ms_per_batch": ".3f", "graph_images_per_s": ".3f", "graph_ms_per_batch": ".3f",
           "gflops_per_image": ".4f", "peak_mem_mib": ".2f"}

    def cell(name: str, value: Any) -> str:
        if value is None:
            return ""  # graphs off, n/a or failed
        if name == "tokens":
            return " ".join(map(str, value))
        return format(value, fmt[name]) if name in fmt else str(value)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + columns)
        for r in report["results"]:
            writer.writerow([report[k] for k in keys] + [cell(c, r[c]) for c in columns])


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                        choices=sorted(DTYPES))
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="for float16/bfloat16: autocast (default; fp32 weights, forward under "
                             "torch.autocast) or half (weights and inputs cast to --dtype)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each model captured in a CUDA graph (default on CUDA; CUDA only)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None,
                        help="images per batch (default 256 on CUDA, 8 on CPU)")
    parser.add_argument("--img-size", type=int_at_least(1), default=None,
                        help="input resolution (default: the model's)")
    parser.add_argument("--warmup", type=int_at_least(0), default=None,
                        help="untimed runs first (default 10 on CUDA, 2 on CPU)")
    parser.add_argument("--runs", type=int_at_least(1), default=None,
                        help="timed runs (default 50 on CUDA, 10 on CPU)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the report as JSON (missing folders are created before the run)")
    parser.add_argument("--csv", default=None, metavar="PATH", help="write the results as CSV (same)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--kernels", action="store_true",
                        help="instead: Triton kernels vs. PyTorch twins per op and end to end (CUDA only)")
    add_method_args(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    with cli_errors(PROG):
        prepare_output(args.json, "--json")
        prepare_output(args.csv, "--csv")
        if args.kernels:
            from . import kernel_bench
            report = kernel_bench.run(dtype=args.dtype, runs=args.runs if args.runs is not None else 30,
                                      precision=args.precision, graphs=args.graphs)
            print(kernel_bench.format_report(report))
            save_json(report, args.json)
            return report
        check_method(args.method)
        options = method_options(args)
        # refused here, before any model is built
        resolve_precision(args.device, args.dtype, args.precision)
        resolve_graphs(args.device, args.graphs)
        cuda = args.device.startswith("cuda")
        report = run_bench(
            args.model, args.method, options, device=args.device, dtype=args.dtype,
            batch_size=args.batch_size if args.batch_size is not None else (256 if cuda else 8),
            warmup=args.warmup if args.warmup is not None else (10 if cuda else 2),
            runs=args.runs if args.runs is not None else (50 if cuda else 10),
            img_size=args.img_size, progress=not args.no_progress, precision=args.precision,
            graphs=args.graphs)
        print(format_table(report))
        save_json(report, args.json)
        if args.csv:
            write_csv(report, args.csv)
        return report


if __name__ == "__main__":
    main()
