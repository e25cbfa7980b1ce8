"""`tome-plus bench`: the unpatched and the patched model, measured in one run.

Reports images/s, ms per batch, FLOPs per image (`torch.utils.flop_counter`, attention counted
on every device), peak activation memory and the tokens left after each layer. On CUDA each model
is also captured whole in a CUDA graph and timed by replay (the patched forward never syncs with
the host, so capture works); the graphed output is checked against eager. All timings are
interleaved run by run, so drift of the machine hits every model alike.

Precision: `--dtype float32` runs in fp32. For float16/bfloat16, `--precision autocast` (the
default) keeps fp32 weights and inputs and runs the forward under `torch.autocast`;
`--precision half` casts weights and inputs to the dtype (the default with --hf).

`--hf SHAPE` benchmarks a random-weight HF LLaVA of a known shape instead (llava-1.5-7b-shape on
a GPU, llava-small-shape on a CPU): the vision side in images/s, the prefill forward of a prompt
with one image and the language model alone on the prompt it gets, all interleaved; FLOPs of the
tower, projector and LLM; the image tokens that reach the LLM. The patched model shares the
unpatched one's weights, so the GPU holds them once. transformers is imported only for --hf.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

import torch

from tome_plus.kv import policy_names

from .common import (Parser, UsageError, add_method_args, check_device, check_method, cli_errors, fill_defaults,
                     int_at_least, method_options, prepare_output, refuse_unread, startup_errors)
from .hf_shapes import check_shape, shapes_help
from .bench_hf import check_site, run_hf_bench
from .measure import run_bench
from .report import bench_csv as write_csv, bench_table as format_table, hf_csv, hf_table, kernels_table, save_json
from .timing import DTYPES, PRECISIONS, resolve_graphs, resolve_hf_precision, resolve_precision

PROG = "tome-plus bench"
DEFAULT_MODEL = "vit_base_patch16_224"
DEFAULT_METHOD = "tome"

# bench's modes, as its refusals name them
TIMM, HF, KV, KERNELS = "a timm model (--model)", "--hf SHAPE", "--hf SHAPE --kv", "--kernels"
METHOD_OPTIONS = ("--method", "--r", "--keep", "--flops", "--tokens", "--budget", "--prop-attn", "--option")
# the options only some modes read, and which: another mode refuses them rather than ignore them
# (every mode reads --dtype, --precision, --runs and --json; --no-progress asks for what --kernels does anyway)
READ_BY = {"--model": (TIMM,), "--img-size": (TIMM,), "--graphs": (TIMM, KERNELS), "--warmup": (TIMM, HF),
           "--csv": (TIMM, HF), "--device": (TIMM, HF, KV), "--batch-size": (TIMM, HF, KV), "--site": (HF,),
           "--text-tokens": (HF, KV), "--kv-option": (KV,), "--new-tokens": (KV,),
           **dict.fromkeys(METHOD_OPTIONS, (TIMM, HF))}


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__)
    parser.add_argument("--model", default=None, help=f"timm model name (default {DEFAULT_MODEL})")
    parser.add_argument("--hf", type=check_shape, default=None, metavar="SHAPE",
                        help="instead of --model: a random-weight HF VLM of a known shape, built here "
                             "(needs transformers); reports vision images/s, prefill and LLM latency, FLOPs "
                             "per part and image tokens. The 7B-8B/13B shapes need a GPU with ~15-18/~28 GB "
                             "in fp16 at batch 1 (weights held once; more with larger batches). Shapes: "
                             + shapes_help().replace("%", "%%"))
    parser.add_argument("--site", choices=("tower", "features", "llm"), default=None,
                        help="--hf: where the method reduces (tome_plus.patch's site; default: the best the "
                             "model allows: tower for vision methods on LLaVA-1.5, features on LLaVA-NeXT, "
                             "Qwen and InternVL, llm for atp and fastv)")
    parser.add_argument("--kv", choices=policy_names(), default=None,
                        help="--hf: decode --new-tokens with the KV policy against the full cache (decode tokens/s, "
                             "KV memory, greedy agreement); see --kv-option")
    parser.add_argument("--kv-option", action="append", default=[], metavar="KEY=VALUE",
                        help="--kv: a policy option (budget=256, forget=0.95, recent=16, scoring=a2sf|h2o|window, "
                             "every=N); repeatable")
    parser.add_argument("--new-tokens", type=int_at_least(2), default=None,
                        help="--kv: tokens generated per prompt (default 1024)")
    parser.add_argument("--text-tokens", type=int_at_least(1), default=None,
                        help="--hf: text tokens per prompt (BOS included) around the image placeholders "
                             "(default 32)")
    parser.add_argument("--device", type=check_device, default=None,
                        help="default cuda when a GPU is present, else cpu (--kernels: CUDA always)")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                        choices=sorted(DTYPES))
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="for float16/bfloat16: autocast (default; fp32 weights, forward under "
                             "torch.autocast) or half (weights and inputs cast to --dtype; default with --hf)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each model captured in a CUDA graph (default on CUDA; CUDA only)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None,
                        help="images per batch (default 256 on CUDA, 8 on CPU; --hf: prompts of one "
                             "image each, 8 on CUDA, 1 on CPU)")
    parser.add_argument("--img-size", type=int_at_least(1), default=None,
                        help="input resolution (default: the model's)")
    parser.add_argument("--warmup", type=int_at_least(0), default=None,
                        help="untimed runs first (default 10 on CUDA, 2 on CPU; --hf: 5 and 1)")
    parser.add_argument("--runs", type=int_at_least(1), default=None,
                        help="timed runs (default 50 on CUDA, 10 on CPU; --hf: 20 and 3)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the report as JSON (missing folders are created before the run)")
    parser.add_argument("--csv", default=None, metavar="PATH", help="write the results as CSV (same)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--kernels", action="store_true",
                        help="instead: Triton kernels vs. PyTorch twins per op and end to end (CUDA only)")
    add_method_args(parser, DEFAULT_METHOD, unset=True)
    return parser


def mode_of(args: argparse.Namespace) -> str:
    """Which bench the command line asks for (`TIMM`, `HF`, `KV` or `KERNELS`); conflicting ones are refused."""
    if args.kv is not None and args.hf is None:
        raise UsageError("--kv measures a language model's decoding: give --hf SHAPE")
    if args.hf is not None and args.kernels:
        raise UsageError("--kernels does not go with --hf: the kernel bench takes no model")
    if args.hf is not None:
        return KV if args.kv is not None else HF
    return KERNELS if args.kernels else TIMM


def main_hf(args: argparse.Namespace) -> Dict[str, Any]:
    """`tome-plus bench --hf SHAPE`: checks, run, table and outputs."""
    check_method(args.method)
    options = method_options(args)
    check_site(args.hf, args.method, args.site)
    resolve_hf_precision(args.device, args.dtype, args.precision)  # refused here, before any model is built
    cuda = args.device.startswith("cuda")
    report = run_hf_bench(
        args.hf, args.method, options, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size if args.batch_size is not None else (8 if cuda else 1),
        text_tokens=args.text_tokens,
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
        runs=args.runs if args.runs is not None else (20 if cuda else 3),
        progress=not args.no_progress, precision=args.precision, site=args.site)
    print(hf_table(report))
    save_json(report, args.json)
    if args.csv:
        hf_csv(report, args.csv)
    return report


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    outputs = " or ".join(option for option, value in (("--json", args.json), ("--csv", args.csv)) if value)
    written = "nothing was written" + (f" ({outputs} at the end)" if outputs else "")
    with cli_errors(PROG, on_interrupt=lambda: f"stopped before the timings were complete; {written}"):
        mode = mode_of(args)
        refuse_unread(args, mode, READ_BY)
        fill_defaults(args, {"method": DEFAULT_METHOD, "device": "cuda" if torch.cuda.is_available() else "cpu",
                             "text_tokens": 32, "new_tokens": 1024})
        prepare_output(args.json, "--json")
        prepare_output(args.csv, "--csv")
        if mode == KV:
            from . import bench_kv
            return bench_kv.main_kv(args)
        if mode == HF:
            return main_hf(args)
        if mode == KERNELS:
            from . import kernel_bench
            report = kernel_bench.run(dtype=args.dtype, runs=args.runs if args.runs is not None else 30,
                                      precision=args.precision, graphs=args.graphs)
            print(kernels_table(report))
            save_json(report, args.json)
            return report
        check_method(args.method, "a timm model")
        options = method_options(args)
        # refused here, before any model is built
        resolve_precision(args.device, args.dtype, args.precision)
        resolve_graphs(args.device, args.graphs)
        cuda = args.device.startswith("cuda")
        report = run_bench(
            args.model or DEFAULT_MODEL, args.method, options, device=args.device, dtype=args.dtype,
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
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
