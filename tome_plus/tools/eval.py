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
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import tome_plus

from ..methods import get_method
from ..training import setup_distributed, teardown_distributed
from .common import (FASHION, Parser, UsageError, add_method_args, check_device, check_input, check_method,
                     cli_errors, data_mode, fill_defaults, int_at_least, is_rank0, method_options, prepare_output,
                     refuse_unread, startup_errors)
from .data import FashionMnist, SafeImageFolder, ShardSampler, collate
from .flops import count_flops
from .models import check_patchable, load_finetuned, load_model, read_finetuned, unpatched_twin
from .report import eval_line as format_result, save_json

PROG = "tome-plus eval"


def evaluate(model_name: Optional[str], data: str, method: Optional[str] = None,
             options: Optional[Dict[str, Any]] = None, pretrained: bool = False, checkpoint: Optional[str] = None,
             batch_size: int = 64, workers: int = 4, amp: bool = False, device: str = "cpu", progress: bool = True,
             finetuned: Optional[str] = None, count: int = 10000,
             status: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Evaluate; in a torchrun job every rank returns the same all-reduced result.

    `finetuned`: a checkpoint of `tome-plus finetune` (its model, method and head) instead of
    `model_name`; `data="fashion-mnist"`: the first `count` Fashion-MNIST test images. `status`,
    when given, is kept up to date with this process's `images` (done) and `total` (its share)."""
    status = status if status is not None else {}
    from timm.data import create_transform, resolve_data_config

    options = dict(options or {})
    if method:
        get_method(method)  # unknown method: error before any work
    fashion = data == "fashion-mnist"
    dataset = None if fashion else SafeImageFolder(data, transform=None)  # a bad folder fails before the model loads
    if dataset is not None and len(dataset) == 0:
        raise FileNotFoundError(f"--data {data!r} holds no images")
    rank, world, dev = setup_distributed(device)
    if dataset is not None and dataset.repeats and rank == 0:
        print(f"{PROG}: note: --data: {len(dataset.repeats)} link(s) lead to images already counted "
              f"({', '.join(dataset.repeats[:3])}); each image counts once, under the class folder it lies in",
              file=sys.stderr)
    try:
        if finetuned:
            payload = read_finetuned(finetuned)
            model, base = load_finetuned(payload), unpatched_twin(payload)
            model_name = model_name or finetuned
            method, options = None, {}
            trained = (payload["method"], payload["options"], payload["head"])
        else:
            model = base = load_model(model_name, pretrained, checkpoint)
            trained = (None, {}, None)
            if method:
                check_patchable(model)
        config = resolve_data_config({}, model=model)
        if fashion:  # the size the model was built for (a pretrained config may name another)
            size = model.patch_embed.img_size[-1]
            config["input_size"] = (3, size, size)
            dataset = FashionMnist(count, size)
        else:
            dataset.transform = create_transform(**config, is_training=False)
        head = tome_plus.heads.name_of(model)
        classes = tome_plus.heads.module(model).num_classes if head else model.num_classes
        if len(dataset.classes) != classes:
            raise ValueError(f"--data has {len(dataset.classes)} classes but the model head has "
                             f"{classes}; use a matching checkpoint or data split")
        model = model.eval().to(dev)
        probe = torch.zeros(1, *config["input_size"], device=dev)
        base_flops = count_flops(base.eval().to(dev), probe)
        if method:
            tome_plus.patch(model, method, **options)
        flops = count_flops(model, probe)

        loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                            num_workers=workers, collate_fn=collate, pin_memory=dev.type == "cuda")
        counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, images, skipped
        amp_ctx = torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16,
                                 enabled=amp)
        start = time.perf_counter()
        status.update(images=0, total=len(loader.sampler))
        with torch.no_grad(), amp_ctx:
            for images, targets, skipped in tqdm(loader, desc=f"eval {model_name}", file=sys.stderr,
                                                 disable=not progress or rank != 0):
                counts[3] += skipped
                if images is None:
                    continue
                images, targets = images.to(dev, non_blocking=True), targets.to(dev)
                top = model(images).topk(min(5, classes), dim=-1).indices
                hits = top == targets[:, None]
                counts[0] += hits[:, 0].sum().item()
                counts[1] += hits.any(dim=-1).sum().item()
                counts[2] += len(targets)
                status["images"] = int(counts[2] + counts[3])
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if world > 1:
            reduce_dev = dev if dev.type == "cuda" else torch.device("cpu")
            counts, elapsed = counts.to(reduce_dev), elapsed.to(reduce_dev)
            dist.all_reduce(counts)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        hit1, hit5, n, skipped = (int(v) for v in counts.tolist())
        return {
            "model": model_name, "checkpoint": checkpoint, "pretrained": pretrained, "data": data,
            "finetuned": finetuned, "method": method or trained[0], "options": options or trained[1],
            "head": trained[2] or head, "top1": 100.0 * hit1 / max(n, 1),
            "top5": 100.0 * hit5 / max(n, 1), "images": n, "skipped": skipped,
            "repeated_links": len(dataset.repeats),
            "images_per_s": n / float(elapsed.item()), "gflops_per_image": flops / 1e9,
            "flops_ratio": flops / base_flops, "world_size": world, "device": str(dev), "amp": amp,
            "batch_size": batch_size, "data_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in config.items()},
        }
    finally:
        teardown_distributed(world)


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
