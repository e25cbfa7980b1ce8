"""`tome-plus eval`: top-1/top-5 of a (patched) timm model on an ImageFolder validation split.

    tome-plus eval --model deit_small_patch16_224 --pretrained --data /data/imagenet/val --method tome --r 13
    torchrun --nproc_per_node=8 -m tome_plus.tools.eval --model ... --data ... --json result.json
    tome-plus eval --finetuned fm.pt --data fashion-mnist

`--finetuned` takes a checkpoint of `tome-plus finetune` (its backbone, method, head and weights)
instead of `--model`; `--data fashion-mnist` evaluates on the Debian Fashion-MNIST test split
(`--count` images) at the model's size.

The folder holds one sub-folder per class; classes are indexed in sorted folder order (ImageNet's
sorted synsets give the standard indices). Images go through timm's data config and eval
transforms for the model. Under `torchrun` each process evaluates its own shard (no sample is
padded or duplicated), the counts are all-reduced and rank 0 prints and writes the result; on CPU
the processes talk through gloo. Unreadable or truncated images are skipped and counted. Links are
followed, and each image file counts once, under the class folder it really lies in (see
`tome_plus.tools.data.scan_image_folder`).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence

import torch

from .common import (FASHION, Parser, UsageError, add_method_args, check_device, check_input, check_method,
                     cli_errors, data_mode, fill_defaults, int_at_least, is_rank0, method_options, prepare_output,
                     refuse_unread, startup_errors)
from .measure import evaluate
from .report import eval_line as format_result, save_json

PROG = "tome-plus eval"


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="timm model name")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub)")
    src.add_argument("--checkpoint", default=None, help="local timm / safetensors / torch checkpoint")
    src.add_argument("--finetuned", default=None, metavar="PATH",
                     help="a checkpoint of `tome-plus finetune`: its model, method and head (no --model)")
    parser.add_argument("--data", required=True,
                        help='ImageFolder validation split (one folder per class), or "fashion-mnist" (test split)')
    parser.add_argument("--count", type=int_at_least(1), default=None,
                        help="fashion-mnist: test images used (default 10000)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64)
    parser.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1))
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="write the result as JSON (rank 0; missing folders are created first)")
    parser.add_argument("--no-progress", action="store_true")
    add_method_args(parser, default_method=None)
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    status: Dict[str, int] = {}

    def interrupted() -> str:
        written = "nothing was written" + (" (--json is written at the end)" if args.json else "")
        if "total" not in status:
            return f"stopped before the evaluation started; {written}"
        share = " (rank 0's share)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        return f"stopped after {status['images']} of {status['total']} images{share}; {written}"

    with cli_errors(PROG, on_interrupt=interrupted):
        refuse_unread(args, data_mode(args.data), {"--count": (FASHION,)})
        fill_defaults(args, {"count": 10000})
        options = method_options(args)
        if options and not args.method:
            raise UsageError("a budget or option needs --method")
        check_method(args.method, "a timm classifier")
        if args.finetuned and (args.model or args.method):
            raise UsageError("--finetuned brings its model and method: no --model, --method or budget")
        if not args.finetuned and not args.model:
            raise UsageError("give --model (or --finetuned PATH)")
        if args.data != "fashion-mnist":
            check_input(args.data, "--data", folder=True)
        check_input(args.checkpoint, "--checkpoint")
        check_input(args.finetuned, "--finetuned")
        rank0 = is_rank0()
        if rank0:
            prepare_output(args.json, "--json")
        result = evaluate(args.model, args.data, args.method, options, pretrained=args.pretrained,
                          checkpoint=args.checkpoint, batch_size=args.batch_size, workers=args.workers,
                          amp=args.amp, device=args.device, progress=not args.no_progress,
                          finetuned=args.finetuned, count=args.count, status=status)
        if rank0:
            print(format_result(result))
            save_json(result, args.json)
        return result


if __name__ == "__main__":
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
