"""Pieces the command-line tools share: method/budget arguments, model creation, memory."""
from __future__ import annotations

import argparse
import ast
import json
import weakref
from typing import Any, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def add_method_args(parser: argparse.ArgumentParser, default_method: Optional[str] = "tome") -> None:
    g = parser.add_argument_group("token reduction (as tome_plus.patch)")
    g.add_argument("--method", default=default_method, help="registered method (see tome_plus.methods())")
    g.add_argument("--r", type=_literal, default=None,
                   help="tokens removed per layer: 16, a list [16,8,...] or ToMe's (r, inflect) e.g. '(16,-1)'")
    g.add_argument("--keep", type=_literal, default=None, help="fraction of tokens kept per layer, e.g. 0.9")
    g.add_argument("--flops", type=float, default=None, help="target fraction of the unpatched FLOPs, e.g. 0.5")
    g.add_argument("--budget", default=None, metavar="KIND=VALUE",
                   help="the budget as one argument, e.g. r=16, keep=0.9, flops=0.5, 'r=(16,-1)'. "
                        "Use this form under torchrun, whose own --rdzv-*/--role options make --r ambiguous")
    g.add_argument("--prop-attn", dest="prop_attn", action=argparse.BooleanOptionalAction, default=None,
                   help="proportional attention (default: the method's)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, value as a Python literal (repeatable)")


def method_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The `tome_plus.patch` keyword options given on the command line."""
    options: Dict[str, Any] = {}
    for name in ("r", "keep", "flops", "prop_attn"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.budget:
        kind, value = next(iter(parse_options([args.budget]).items()))
        if kind not in ("r", "keep", "flops"):
            raise SystemExit(f"--budget kind must be r, keep or flops, got {kind!r}")
        options[kind] = value
    options.update(parse_options(args.option))
    return options


def parse_options(items) -> Dict[str, Any]:
    """`["KEY=VALUE", ...]` -> dict, each value a Python literal where it parses as one."""
    options: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--option takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = _literal(value.strip())
    return options


def save_json(report: Dict[str, Any], path: Optional[str]) -> None:
    """Write a tool's report as indented JSON (nothing when no path was given)."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def describe(method: str, options: Dict[str, Any]) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors allocated while active, on any device (weights and inputs excluded).

    Works on CPU, where torch keeps no allocator statistics: every op output whose storage is new
    is counted until Python frees that storage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: set = set()
        self.current = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self.live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live or key in inputs:  # views share their input's storage
                continue
            self.live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out
