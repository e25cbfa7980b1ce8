"""Warnings that point at the user's line, not at tome_plus (or torch/timm frames in between)."""
from __future__ import annotations

import os
import sys
import warnings

import timm
import torch

_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                  for m in (sys.modules[__name__.rsplit(".", 1)[0]], torch, timm))


def warn_caller(message: str, category: type = UserWarning) -> None:
    """`warnings.warn` with the stack level of the first frame outside tome_plus, torch and timm.

    A budget warning can come from `patch` or from deep inside a forward (nn.Module call
    machinery, timm's forward); a fixed stacklevel would point at either tome_plus or torch.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
