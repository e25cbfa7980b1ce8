"""`tome-plus`: the command-line entry point.

Exit status: 0 on success, 2 for a refused command line, 1 for a failed run; errors are one line
`tome-plus <cmd>: error: ...` on stderr (see `tome_plus.tools.common`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import atp_train, bench, diffrate_search, eval as evaluate, fidelity, finetune, vis
from .common import Parser

COMMANDS = {
    "bench": (bench, "throughput: unpatched vs. patched in one run"),
    "eval": (evaluate, "top-1/top-5 on an ImageFolder split (torchrun for several processes)"),
    "fidelity": (fidelity, "offline quality: real DINOv2 weights, Fashion-MNIST k-NN, every method"),
    "vis": (vis, "draw which patches each token stands for"),
    "diffrate-search": (diffrate_search, "search DiffRate's per-block kept counts for a FLOPs target"),
    "finetune": (finetune, "fine-tune a patched classifier with the CLCA head or its own (torchrun capable)"),
    "atp-train": (atp_train, "train ATP's modules inside a LLaVA model (torchrun for several processes)"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(prog="tome-plus", description="token reduction for vision transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.build_parser(sub.add_parser(name, help=help_text, description=module.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    COMMANDS[args.command][0].main(args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
