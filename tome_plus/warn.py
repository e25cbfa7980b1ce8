"""Warnings that point at the user's line, not at tome_plus (or torch/timm frames in between)."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings


def _folder(package: str) -> str:
    """Where `package` lives, found without importing it (a timm-free user never loads timm)."""
    spec = importlib.util.find_spec(package)
    origin = spec.origin if spec is not None and spec.origin else ""
    return os.path.dirname(os.path.abspath(origin)) + os.sep if origin else ""


_INTERNAL = tuple(filter(None, map(_folder, (__name__.rsplit(".", 1)[0], "torch", "timm", "transformers"))))


def warn_caller(message: str, category: type = UserWarning) -> None:
    """`warnings.warn` with the stack level of the first frame outside tome_plus, torch, timm and
    transformers.

    A budget warning can come from `patch` or from deep inside a forward (nn.Module call
    machinery, timm's forward); a fixed stacklevel would point at either tome_plus or torch.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
