"""`tome-plus`: the command-line entry point.

Exit status: 0 on success, 2 for a refused command line, 1 for a failed run, 130 after Ctrl-C;
errors are one line `tome-plus <cmd>: error: ...` on stderr (see `tome_plus.tools.common`).
`tome-plus` alone prints the usage and the commands to stderr and exits with 2 (argparse's
convention for a missing argument); `tome-plus --help` prints the same to stdout and exits with 0.

The tools are imported inside `main`, under `startup_errors`: Ctrl-C while they load, or a
torchvision that does not match torch, is one line too.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Optional, Sequence

from .common import EXIT_USAGE, Parser, startup_errors

# command: (its module in tome_plus.tools, its line in the command list)
COMMANDS = {
    "bench": ("bench", "throughput: unpatched vs. patched in one run"),
    "eval": ("eval", "top-1/top-5 on an ImageFolder split (torchrun for several processes)"),
    "fidelity": ("fidelity", "offline quality: real DINOv2 weights, Fashion-MNIST k-NN, every method"),
    "sweep": ("sweep", "methods x budgets: accuracy against measured speed-up and FLOPs (CSV, JSON, PNG)"),
    "vis": ("vis", "draw which patches each token stands for"),
    "diffrate-search": ("diffrate_search", "search DiffRate's per-block kept counts for a FLOPs target"),
    "finetune": ("finetune", "fine-tune a patched classifier with the CLCA head or its own (torchrun capable)"),
    "atp-train": ("atp_train", "train ATP's modules inside a LLaVA model (torchrun for several processes)"),
}


def tool(command: str) -> ModuleType:
    """The module of `command`."""
    return importlib.import_module(f".{COMMANDS[command][0]}", __package__)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="tome-plus", description="token reduction for vision transformers",
                    epilog="`tome-plus COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"tome_plus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        module = tool(name)
        module.build_parser(sub.add_parser(name, help=help_text, description=module.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # named before the parser has read it: the one line of a Ctrl-C while the tools load names the command
    prog = "tome-plus" + (f" {argv[0]}" if argv and argv[0] in COMMANDS else "")
    with startup_errors(prog):  # a tool's own `cli_errors` reports where its work stopped
        parser = build_parser()
        if not argv:  # no command: the usage and the command list, as argparse does for a missing argument
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args = parser.parse_args(argv)
        tool(args.command).main(args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
