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
`scan_image_folder`).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

import tome_plus

from ..methods import get_method
from .common import (Parser, UsageError, add_method_args, check_device, check_input, check_method, cli_errors,
                     describe, int_at_least, is_rank0, method_options, prepare_output, save_json,
                     setup_distributed, teardown_distributed)
from .flops import count_flops

PROG = "tome-plus eval"


def scan_image_folder(root: str) -> Tuple[List[str], List[Tuple[str, int]], List[str]]:
    """Classes, `(path, class index)` samples and repeated links of an ImageFolder split.

    Classes and image extensions are torchvision ImageFolder's, and links are followed as there,
    but every image file is counted once. ImageFolder walks a directory link loop (`class_a/loop
    -> ..`) again and again and labels every file it reaches by the class folder it went through:
    a folder of 15 images becomes 615 samples, most of them under the wrong class. Here every
    real folder is walked once and every file is taken once (by its real path), labelled by the
    class folder it really lies in. A file whose real path is outside every class folder (class
    folders or images linked in from elsewhere, a common layout) takes the class folder it was
    reached through, the first in sorted order if several reach it. The links that led to
    something already counted are returned (relative to `root`) so the caller can say so.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

    classes, _ = find_classes(root)
    class_of_dir = {os.path.realpath(os.path.join(root, c)): i for i, c in enumerate(classes)}
    walked = {os.path.realpath(root), *class_of_dir}
    found: Dict[str, Tuple[str, int]] = {}  # real path -> (path it was reached by, class)
    repeats: List[str] = []

    @functools.lru_cache(maxsize=None)
    def class_of(folder: str) -> Optional[int]:
        """The class folder that `folder` (a real path) lies in, if any."""
        if folder in class_of_dir:
            return class_of_dir[folder]
        parent = os.path.dirname(folder)
        return None if parent == folder else class_of(parent)

    for index, name in enumerate(classes):
        for folder, subfolders, files in os.walk(os.path.join(root, name), followlinks=True):
            kept = []
            for sub in sorted(subfolders):
                real = os.path.realpath(os.path.join(folder, sub))
                if real in walked:  # a loop, or a folder that is (or will be) walked on its own
                    repeats.append(os.path.relpath(os.path.join(folder, sub), root))
                else:
                    walked.add(real)
                    kept.append(sub)
            subfolders[:] = kept
            real_folder = os.path.realpath(folder)
            for file in sorted(files):
                if not has_file_allowed_extension(file, IMG_EXTENSIONS):
                    continue
                path = os.path.join(folder, file)
                # one lstat per plain file: resolving every path in full is slow on ImageNet-size folders
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_folder, file)
                if real in found:
                    repeats.append(os.path.relpath(path, root))
                else:
                    home = class_of(os.path.dirname(real))
                    found[real] = (path, index if home is None else home)
    samples = sorted(found.values(), key=lambda s: (s[1], s[0]))
    return classes, samples, repeats


class SafeImageFolder(Dataset):
    """An ImageFolder (each file once, see `scan_image_folder`) that yields None for images it
    cannot decode instead of raising."""

    def __init__(self, root: str, transform) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r} is not a directory")
        try:
            self.classes, self.samples, self.repeats = scan_image_folder(root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--data {root!r} holds no class folders with images ({e})") from None
        counted = {target for _, target in self.samples}
        empty = [c for i, c in enumerate(self.classes) if i not in counted]
        if empty:
            raise FileNotFoundError(f"--data {root!r}: class folder(s) {empty[:5]} hold no images of their own "
                                    "(linked files count once, under the class folder they lie in)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # forces the full decode: truncated files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, target
        return self.transform(img), target


def collate(batch):
    good = [(x, y) for x, y in batch if x is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped


class ShardSampler(Sampler):
    """Indices rank, rank + world, ...: every sample exactly once over all ranks (no padding)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def classifier_key(name: str, **kwargs: Any) -> str:
    """The state_dict key of the classifier weights of timm's `name` (`head.weight` for a ViT,
    `fc.weight` for a ResNet, ...), from the model built without memory (meta tensors)."""
    import timm

    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, **kwargs)
    head = probe.get_classifier()
    head = head[0] if isinstance(head, (tuple, list)) else head
    prefix = {id(m): n for n, m in probe.named_modules()}.get(id(head))
    return f"{prefix}.weight" if prefix else "head.weight"


def check_patchable(model) -> None:
    """A model tome_plus cannot patch is refused before any work (TypeError, exit 1)."""
    from ..backends import find_backend

    find_backend(model)


def load_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs: Any):
    """A timm model from the hub (`pretrained`) or a local checkpoint, whose head size it takes;
    `kwargs` go to `timm.create_model`."""
    import timm
    from timm.models import load_state_dict

    if pretrained and checkpoint:
        raise ValueError("give --pretrained or --checkpoint, not both")
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint!r} does not exist")
        try:
            state = load_state_dict(checkpoint)
        except Exception as e:  # safetensors, pickle and zip readers share no base error class
            raise ValueError(f"--checkpoint {checkpoint!r} could not be read as a timm, safetensors or "
                             f"torch checkpoint ({type(e).__name__}: {e})") from None
        key = classifier_key(name, **kwargs)
        if key not in state:
            raise ValueError(f"{checkpoint} has no classifier weights for {name} ({key!r}); a checkpoint "
                             f"without its classifier cannot be evaluated")
        model = timm.create_model(name, pretrained=False, num_classes=state[key].shape[0], **kwargs)
        own = model.state_dict()
        shapes = [f"{k} is {tuple(v.shape)} there, {tuple(own[k].shape)} here"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        problems = []
        if shapes:
            problems.append(f"{len(shapes)} tensor shape(s) differ, e.g. {shapes[0]}")
        if missing:
            problems.append(f"missing {missing[:5]}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}")
        if problems:
            raise ValueError(f"{checkpoint} does not fit {name}: " + "; ".join(problems))
        model.load_state_dict(state)
        return model
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # hub unreachable, no weights for this name, ...
            raise RuntimeError(f"could not get pretrained weights for {name} from the model hub "
                               f"({type(e).__name__}: {e}); pass a local file with --checkpoint PATH") from None
    return timm.create_model(name, pretrained=False, **kwargs)


class FashionMnist(Dataset):
    """The first `count` Fashion-MNIST test images at `size` px (as `tome-plus fidelity` feeds them)."""

    classes = tuple(range(10))
    repeats: List[str] = []

    def __init__(self, count: int, size: int) -> None:
        from .fidelity import fashion_mnist
        self.images, self.labels = fashion_mnist("test", count)
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from .fidelity import to_model_input
        return to_model_input(self.images[index:index + 1], self.size)[0], int(self.labels[index])


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
            from .finetune import load_finetuned, read_checkpoint, unpatched_twin
            payload = read_checkpoint(finetuned)
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
    parser.add_argument("--count", type=int_at_least(1), default=10000, help="fashion-mnist: test images used")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64)
    parser.add_argument("--workers", type=int_at_least(0), default=min(8, os.cpu_count() or 1))
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="write the result as JSON (rank 0; missing folders are created first)")
    parser.add_argument("--no-progress", action="store_true")
    add_method_args(parser, default_method=None)
    return parser


def format_result(r: Dict[str, Any]) -> str:
    what = describe(r["method"], r["options"]) if r["method"] else "unpatched"
    what += f" + {r['head']} head" if r.get("head") else ""
    return (f"{r['model']} | {what} | top-1 {r['top1']:.2f} | top-5 {r['top5']:.2f} | "
            f"{r['images']} images ({r['skipped']} skipped) | {r['images_per_s']:.1f} images/s | "
            f"{r['gflops_per_image']:.2f} GFLOPs ({r['flops_ratio']:.2f}x) | {r['world_size']} process(es)")


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
        options = method_options(args)
        if options and not args.method:
            raise UsageError("a budget or option needs --method")
        check_method(args.method)
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
    main()
