"""The backend contract: what a model family must answer, and nothing else.

A backend module (`timm_vit.py`, `hf_clip.py`, `hf_llava.py`) is a `Backend`: it says which
modules reduce, how q/k/v come out of their attention (`reduce.QKV`), which tokens are protected
(`PatchInfo.n_prefix`) and what a layer costs (a `CostModel` for the FLOPs solver). The reduce step
itself is `reduce.prenorm_layer` / `reduce.reduce_step`, shared by all of them.

Adding a family is one module that answers every member of `Backend` (constants and functions;
`missing(module)` lists what it lacks, and the tests check every registered backend) plus one
line in `backends/__init__.py`'s `REGISTRY`. `api.patch` reads the capabilities (`HEADS`,
`LLM_METHODS`) directly: a backend states them, even where the answer is no. What the family
needs beyond the shared `PatchInfo` goes into a record of its own, `PatchInfo.parts`; the record
names its backend (`PatchInfo.backend`, set by `patch`), so `inspect` asks that backend alone.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch.nn as nn

from ..methods.base import ReductionConfig, Reducer
from ..schedule import Cost
from ..state import TokenState
from .base import PatchInfo

CostModel = Callable[[int], Cost]  # tokens entering the first layer -> that forward's FLOPs model


class Backend(Protocol):
    """One model family. Modules satisfy it (PEP 544): each backend is a module of functions."""

    KIND: str  # the family name methods see in `Reducer.for_family` ("timm", "hf")
    FAMILY: str  # what it patches, for error messages
    # Capabilities, checked by `patch` before anything changes:
    HEADS: bool  # a classifier whose head `patch(head=...)` may replace (`heads/`, e.g. CLCA)
    LLM_METHODS: bool  # methods with `Reducer.target == "llm"` (ATP: inside a language model) run here
    # where `patch(site=...)` may place a method (a VLM's); () where there is one place. A backend
    # with SITES also has `check_site(model, method_class, site) -> site` (None: its best), which
    # `patch` asks before the method's options
    SITES: Tuple[str, ...]
    KV: bool  # a KV-cache policy (`patch(kv=...)`, `tome_plus.kv`) runs here; such a backend has `prepare_kv`

    def matches(self, model: nn.Module) -> bool:
        """Whether this backend patches `model`."""

    def depth(self, model: nn.Module) -> int:
        """Number of layers that may reduce (what per-layer budgets and layer lists index)."""

    def default_tokens(self, model: nn.Module) -> int:
        """Tokens entering the first layer at the model's default input size."""

    def prepare(self, model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
        """Check the model and describe it (prefix, cost model, `parts`); changes nothing. A
        backend with `SITES` also takes `site=` (None: its best)."""

    def model_name(self, model: nn.Module) -> Optional[str]:
        """The model's name where known (timm's with its tag), for methods with per-model presets
        (`base.model_name` reads timm's and HF's)."""

    def check_budget(self, model: nn.Module, info: PatchInfo) -> None:
        """Raise for a budget the model cannot meet (at `patch`, before anything changes)."""

    def install(self, model: nn.Module, info: PatchInfo) -> None:
        """Swap in the reducing classes (the model is unpatched when called)."""

    def last_forward(self, info: PatchInfo) -> Tuple[Optional[TokenState], Dict[str, Any]]:
        """What `inspect` reports of the last forward: the token state of the layers that reduced
        (None before any forward) and the family's own `Inspection` fields by name (LLaVA:
        `image_tokens`, `llm_kept`, `llm_positions`, `llm_newlines`); `base.last_forward` where
        there are none."""


def members() -> List[str]:
    """Every name a backend module must define: the protocol's constants and functions."""
    functions = [name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")]
    return sorted(set(Backend.__annotations__) | set(functions))


def missing(backend: Any) -> List[str]:
    """The members of `Backend` that `backend` (a module) does not define."""
    return [name for name in members() if not hasattr(backend, name)]
