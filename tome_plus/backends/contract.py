"""The backend contract: what a model family must answer, and nothing else.

A backend module (`timm_vit.py`, `hf_clip.py`, `hf_llava.py`) is a `Backend`: it says which
modules reduce, how q/k/v come out of their attention (`reduce.QKV`), which tokens are protected
(`PatchInfo.n_prefix`) and what a layer costs (a `CostModel` for the FLOPs solver). The reduce step
itself is `reduce.prenorm_layer` / `reduce.reduce_step`, shared by all of them.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch.nn as nn

from ..methods.base import ReductionConfig, Reducer
from ..schedule import Cost
from .base import PatchInfo

CostModel = Callable[[int], Cost]  # tokens entering the first layer -> that forward's FLOPs model


class Backend(Protocol):
    """One model family. Modules satisfy it (PEP 544): each backend is a module of functions."""

    KIND: str  # the family name methods see in `Reducer.for_family` ("timm", "hf")
    FAMILY: str  # what it patches, for error messages

    def matches(self, model: nn.Module) -> bool:
        """Whether this backend patches `model`."""

    def depth(self, model: nn.Module) -> int:
        """Number of layers that may reduce (what per-layer budgets and layer lists index)."""

    def default_tokens(self, model: nn.Module) -> int:
        """Tokens entering the first layer at the model's default input size."""

    def prepare(self, model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
        """Check the model and describe it (prefix, cost model); changes nothing."""

    def model_name(self, model: nn.Module) -> Optional[str]:
        """The model's name where known (timm's with its tag), for methods with per-model presets."""

    def check_budget(self, model: nn.Module, info: PatchInfo) -> None:
        """Raise for a budget the model cannot meet (at `patch`, before anything changes)."""

    def install(self, model: nn.Module, info: PatchInfo) -> None:
        """Swap in the reducing classes (the model is unpatched when called)."""
