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
the end, and `--resume` continues from it (with the same --keep and model; an existing `--out` is
refused without `--resume` or `--overwrite`). Ctrl-C prints where the run stopped and which step
`--out` holds. The result loads with
`tome_plus.patch(model, "atp", keep=..., layers=..., weights="atp.pt")`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from ..training.checkpoint import file_stamp as _stamp, saved_step as _saved_step, shape_mismatches
from ..training.distributed import setup_distributed, teardown_distributed
from .common import (Parser, UsageError, check_checkpoint_out, check_device, check_options, cli_errors, int_at_least,
                     is_rank0, prepare_output, startup_errors)
from .data import jsonl_batches, synthetic_batches
from .hf_shapes import SHAPES, build_llava, check_shape, require_transformers

PROG = "tome-plus atp-train"


class Progress:
    """Where a run is, for the line Ctrl-C prints: the step it reached and the step `--out` holds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start: Optional[int] = None  # the step training went on from (None: not started)
        self.drawn = self.done = 0  # batches drawn since, and steps done since
        self.before = _stamp(args.out)  # --out as it was before this run (to tell a new checkpoint)

    def batches(self, batches: Iterator[Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
        """`batches`, counting the steps: the trainer asks for a batch once the step before is done."""
        for batch in batches:
            self.drawn += 1
            yield batch
            self.done = self.drawn

    def interrupted(self) -> str:
        args = self.args
        where = ("stopped before training started" if self.start is None
                 else f"stopped after step {self.start + self.done} of {args.steps}")
        if not os.path.exists(args.out):
            if self.start is not None and self.done:
                return (f"{where}, before the first checkpoint (every --save-every {args.save_every} steps): "
                        "nothing was written")
            return f"{where}: nothing was written"
        step = _saved_step(args.out)
        if _stamp(args.out) == self.before and not args.resume:
            return f"{where}: {args.out} was not replaced yet (it still holds the earlier run's step {step})"
        return (f"{where}; {args.out} holds step {step}: run the same command with --resume to continue "
                "from there")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint `tome_plus.atp.train` wrote (the modules, their layers, optimizer and step)."""
    from ..training.atp import read_checkpoint as read  # transformers: imported when it is needed
    return read(path)


def check_resume(payload: Dict[str, Any], args: argparse.Namespace) -> None:
    """What a command line can contradict in the checkpoint it resumes: --keep, --layers (usage errors)."""
    if payload.get("keep", args.keep) != args.keep:  # `tome_plus.atp.train` records its keep target
        raise UsageError(f"--resume: {args.out} was trained for --keep {payload['keep']}, not {args.keep}; "
                         "resume with its --keep, or start a new --out")
    if args.layers and list(args.layers) != list(payload["layers"]):
        raise UsageError(f"--resume: {args.out} holds modules after layers {list(payload['layers'])}, not "
                         f"--layers {list(args.layers)}; resume with its layers, or start a new --out")


def check_fits(payload: Dict[str, Any], mods: torch.nn.Module, args: argparse.Namespace) -> None:
    """The checkpoint's modules must be those of this model (layers, widths): a usage error in one line."""
    what = f"--model {args.model}" if args.model else f"--hf-shape {args.hf_shape}"
    if list(payload["layers"]) != list(mods.layers):
        raise UsageError(f"--resume: {args.out} holds modules after layers {list(payload['layers'])}, {what} "
                         f"puts them after {list(mods.layers)}; resume with the model it was trained on, or "
                         "start a new --out")
    own, saved = mods.state_dict(), payload["modules"]
    shapes = shape_mismatches(saved, own)
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if shapes or missing or unexpected:
        detail = (f"{len(shapes)} tensor shape(s) differ, e.g. {shapes[0]}" if shapes
                  else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise UsageError(f"--resume: {args.out} holds ATP modules of another model shape than {what} ({detail}); "
                         "resume with the model it was trained on, or start a new --out")


def run(args: argparse.Namespace, progress: Optional[Progress] = None) -> List[Dict[str, float]]:
    require_transformers()
    import tome_plus
    progress = progress or Progress(args)
    rank, world, dev = setup_distributed(args.device)
    device = str(dev)
    try:
        payload = None
        if args.resume:  # checked before the model is built (every rank reads --out: a shared file system)
            payload = read_checkpoint(args.out)
            check_resume(payload, args)
            if payload["step"] >= args.steps:
                if rank == 0:
                    print(f"{PROG}: note: {args.out} already holds step {payload['step']} of --steps {args.steps}: "
                          "nothing to do (raise --steps to train on)", file=sys.stderr)
                return []
        processor = None
        if args.model:
            from transformers import AutoProcessor, LlavaForConditionalGeneration
            model = LlavaForConditionalGeneration.from_pretrained(args.model).to(device).eval()
            if args.data != "synthetic":
                processor = AutoProcessor.from_pretrained(args.model)
        else:
            model = build_llava(args.hf_shape, device=device, seed=args.seed)
        options: Dict[str, Any] = {"keep": args.keep}
        if args.layers:
            options["layers"] = args.layers
        tome_plus.patch(model, "atp", **options)
        if payload is not None:
            check_fits(payload, tome_plus.atp.modules(model), args)
        if args.data == "synthetic":
            batches = synthetic_batches(model.config, args.batch_size, args.seed + 1000 * rank, device)
        else:
            batches = jsonl_batches(args.data, processor, args.batch_size, rank, world, device)
        progress.start = payload["step"] if payload is not None else 0
        history = tome_plus.atp.train(model, progress.batches(batches), steps=args.steps, lr=args.lr,
                                      checkpoint=args.out, save_every=args.save_every, resume=args.resume,
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
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the checkpoint at --out (same --keep and model; an error when there is none)")
    resume.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint at --out (without --resume or this, an existing --out is refused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> List[Dict[str, float]]:
    args = args or build_parser().parse_args(argv)
    progress = Progress(args)
    with cli_errors(PROG, on_interrupt=progress.interrupted):
        if not 0.0 < args.keep <= 1.0:
            raise UsageError(f"--keep must lie in (0, 1], got {args.keep}")
        check_options("atp", {"keep": args.keep, **({"layers": args.layers} if args.layers else {})})
        if args.data != "synthetic" and not args.model:
            raise UsageError("--data FILE needs --model (its processor builds the prompts); use --data synthetic "
                             "with --hf-shape")
        if args.data != "synthetic" and not os.path.isfile(args.data):
            raise UsageError(f"--data {args.data!r} is not a file")
        if is_rank0():
            prepare_output(args.out, "--out")
        check_checkpoint_out(args.out, args.resume, args.overwrite)
        return run(args, progress)


if __name__ == "__main__":
    with startup_errors(PROG):  # `python -m`: Ctrl-C before the run is one line too
        main()
