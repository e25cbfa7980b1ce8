"""`tome-plus`: the command-line entry point."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import bench


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tome-plus", description="token reduction for vision transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.build_parser(sub.add_parser("bench", help="throughput: unpatched vs. patched in one run",
                                      description=bench.__doc__))
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench.main(args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
