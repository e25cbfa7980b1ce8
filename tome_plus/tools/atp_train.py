"""`tome-plus atp-train`: train ATP's modules inside a LLaVA model (LLM and tower frozen).

    tome-plus atp-train --hf-shape llava-tiny --data synthetic --steps 50 --out atp.pt
    torchrun --nproc_per_node=4 -m tome_plus.tools.atp_train --model llava-hf/llava-1.5-7b-hf \\
        --data train.jsonl --keep 0.25 --steps 2000 --out atp.pt

`--model` loads an HF checkpoint (its processor too); `--hf-shape` builds a random model of a
known shape (for trying the pipeline without weights). `--data` is a JSON-lines file with
{"image": PATH, "prompt": TEXT, "answer": TEXT} per line (the loss is on the answer's tokens;
needs `--model` for the processor), or `synthetic` (random images and token prompts, for smoke
tests). Under `torchrun` every process trains on its own shard (gloo on CPU, NCCL on GPU) and
the modules stay identical across ranks; rank 0 writes `--out` every `--save-every` steps and at
the end, and `--resume` continues from it. The result loads with
`tome_plus.patch(model, "atp", keep=..., layers=..., weights="atp.pt")`.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from .common import (Parser, UsageError, check_device, cli_errors, int_at_least, prepare_output, setup_distributed,
                     teardown_distributed)
from .hf_shapes import SHAPES, check_shape, require_transformers

PROG = "tome-plus atp-train"


def synthetic_batches(config, batch_size: int, seed: int, device: str) -> Iterator[Dict[str, torch.Tensor]]:
    """Random images and prompts with the processor's placeholder count; the loss on the text."""
    from .hf_shapes import make_inputs
    step = 0
    while True:
        ids, mask, pixels = make_inputs(config, batch_size, text_tokens=16, device=device, seed=seed + step)
        labels = torch.where(ids == config.image_token_id, -100, ids)
        yield dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        step += 1


def jsonl_batches(path: str, processor, batch_size: int, rank: int, world: int, device: str
                  ) -> Iterator[Dict[str, torch.Tensor]]:
    """Batches of this rank's lines of a JSON-lines file; labels cover the answer's tokens only."""
    from PIL import Image
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][rank::world]
    if not rows:
        raise ValueError(f"{path} has no samples for rank {rank} of {world}")
    while True:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = [Image.open(r["image"]).convert("RGB") for r in chunk]
            prompts = [r["prompt"] for r in chunk]
            full = [p + " " + r["answer"] for p, r in zip(prompts, chunk)]
            inputs = processor(images=images, text=full, return_tensors="pt", padding=True)
            prompt_lens = [len(processor(images=im, text=p, return_tensors="pt")["input_ids"][0])
                           for im, p in zip(images, prompts)]
            labels = inputs["input_ids"].clone()
            for i, n in enumerate(prompt_lens):
                pad = int((inputs["attention_mask"][i] == 0).sum()) if processor.tokenizer.padding_side == "left" else 0
                labels[i, :pad + n] = -100
            labels[inputs["attention_mask"] == 0] = -100
            inputs["labels"] = labels
            yield {k: v.to(device) for k, v in inputs.items()}


def run(args: argparse.Namespace) -> List[Dict[str, float]]:
    require_transformers()
    import tome_plus
    rank, world, dev = setup_distributed(args.device)
    device = str(dev)
    try:
        processor = None
        if args.model:
            from transformers import AutoProcessor, LlavaForConditionalGeneration
            model = LlavaForConditionalGeneration.from_pretrained(args.model).to(device).eval()
            if args.data != "synthetic":
                processor = AutoProcessor.from_pretrained(args.model)
        else:
            from .hf_shapes import build_llava
            model = build_llava(args.hf_shape, device=device, seed=args.seed)
        options: Dict[str, Any] = {"keep": args.keep}
        if args.layers:
            options["layers"] = args.layers
        tome_plus.patch(model, "atp", **options)
        if args.data == "synthetic":
            batches = synthetic_batches(model.config, args.batch_size, args.seed + 1000 * rank, device)
        else:
            batches = jsonl_batches(args.data, processor, args.batch_size, rank, world, device)
        history = tome_plus.atp.train(model, batches, steps=args.steps, lr=args.lr, checkpoint=args.out,
                                      save_every=args.save_every, resume=args.resume,
                                      progress=not args.no_progress)
        if rank == 0 and history:
            last = history[-1]
            print(f"step {last['step']}: loss {last['loss']:.4f} (lm {last['lm_loss']:.4f}, budget "
                  f"{last['budget_loss']:.4f}), visual tokens kept {last['kept']:.3f} (target {args.keep}) "
                  f"-> {args.out}")
        return history
    finally:
        teardown_distributed(world)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an HF LLaVA checkpoint (name or folder)")
    source.add_argument("--hf-shape", type=check_shape, help=f"a random model of a known shape: {', '.join(SHAPES)}")
    parser.add_argument("--data", required=True, help='JSON-lines file ({"image", "prompt", "answer"}) or "synthetic"')
    parser.add_argument("--out", required=True, help="where the ATP weights (and the resume state) go")
    parser.add_argument("--keep", type=float, default=0.25, help="visual tokens kept, averaged over layers")
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layers followed by a module")
    parser.add_argument("--steps", type=int_at_least(1), default=1000)
    parser.add_argument("--batch-size", type=int_at_least(1), default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-every", type=int_at_least(1), default=100)
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> List[Dict[str, float]]:
    args = args or build_parser().parse_args(argv)
    with cli_errors(PROG):
        if not 0.0 < args.keep <= 1.0:
            raise UsageError(f"--keep must lie in (0, 1], got {args.keep}")
        if args.data != "synthetic" and not args.model:
            raise UsageError("--data FILE needs --model (its processor builds the prompts); use --data synthetic "
                             "with --hf-shape")
        if args.data != "synthetic" and not os.path.isfile(args.data):
            raise UsageError(f"--data {args.data!r} is not a file")
        if int(os.environ.get("RANK", "0")) == 0:
            prepare_output(args.out, "--out")
        return run(args)


if __name__ == "__main__":
    main()
