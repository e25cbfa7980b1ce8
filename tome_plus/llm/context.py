"""What reaches a patched language model from outside its own forward: `LlmInputs` (which of the
current tokens are visual, where each image's run is, what the caller said), `LlmCall` (what an
outer entry point tells the inner VLM forward that builds them) and the context variables that
carry both, and a KV policy's per-forward state, across transformers' own code.

Public for higher layers: `current_inputs` and `running_with` (`tome-plus bench --hf` runs the
language model alone as inside a VLM forward) and `collecting` (ATP's training loop,
`training.atp.forward_kept`, reads the soft masks' kept fraction).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional

import torch
from torch.compiler import is_compiling


@dataclass
class LlmInputs:
    """What the LLaVA forward tells its language model about the current tokens."""

    visual: torch.Tensor  # [B, L] bool: image tokens
    spatial: torch.Tensor  # [B, L] float: SAP grid score of each image token (0 elsewhere)
    has_visual: bool
    soft: bool = False  # training: soft masks, nothing removed
    images: Optional[torch.Tensor] = None  # [B] images (and videos) whose tokens each row holds (FastV's `tokens`)
    # the features site: [B, L] each visual token's image (or video) within its row, -1 elsewhere
    runs: Optional[torch.Tensor] = None
    # the features site: [D] the embedding of tokens that are never reduced (LLaVA-NeXT's newline), or None
    newline: Optional[torch.Tensor] = None
    # the [B, L] padding mask the VLM's forward got (or None), where it hands its language model
    # prepared masks instead (Gemma 3's dict per layer type)
    attention_mask: Optional[torch.Tensor] = None
    # [B, L] each token's image block (-1: text) where the decoder's row has an image's tokens attend
    # each other both ways and the call says which are images (Gemma 3's `token_type_ids`), else None
    groups: Optional[torch.Tensor] = None
    # generate without a cache re-runs prompt + generated tokens: only the prompt's text counts
    # as the instruction, so each step decides as the cached prefill did
    prompt_length: Optional[int] = None
    # training: the answer's tokens (labels != -100) are not part of the instruction that scores
    answer: Optional[torch.Tensor] = None
    # filled in by the decoder, for inspect and the training loss
    kept: List[torch.Tensor] = field(default_factory=list)  # per module: [B] visual tokens kept
    newlines: Optional[torch.Tensor] = None  # the features site: [B] newline tokens among kept[0] (never reduced)
    positions: List[torch.Tensor] = field(default_factory=list)  # per module: [B, K] position ids (-1: pad)
    kept_fraction: Optional[torch.Tensor] = None  # [B] visual fraction averaged over layers (soft)


@dataclass(frozen=True, eq=False)
class LlmCall:
    """What the caller of a patched LLaVA model tells the forward that builds `LlmInputs` (the
    inner `LlavaModel`'s), several HF calls deeper: each field is set by one entry point."""

    prompt_length: Optional[int] = None  # `generate`: the prompt's length (the fitted one)
    answer: Optional[torch.Tensor] = None  # the LLaVA forward, from its labels: `[B, L]` the answer's tokens
    # `collecting`: forwards run with soft masks and leave their LlmInputs here (for the budget loss)
    collect: Optional[List[LlmInputs]] = None


# The context variables below carry per-call data across HF's own code, where no argument
# can: transformers' `**kwargs` reach the vision tower and the loss as well, and `generate` refuses
# arguments its model does not name. Nested and concurrent calls each see their own.
#
# CALL: from our outer entry points (`PatchedVlmForGeneration.generate` and `.forward`,
# `collecting`) to `PatchedVlmModel.forward` (`vlm.calls`), across `GenerationMixin.generate` and
# `LlavaForConditionalGeneration.forward` (which calls `self.model(...)` without the labels).
CALL: contextvars.ContextVar[LlmCall] = contextvars.ContextVar("tome_plus_llm_call", default=LlmCall())
# KV_STEP: a KV-cache policy's state for the current decoder forward (`tome_plus.kv`), to the
# routed attention of every layer (which scores the new queries and masks pruned layers).
KV_STEP: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("tome_plus_kv_step", default=None)
# INPUTS: the `LlmInputs` `PatchedVlmModel.forward` built, to the decoder (`PruningDecoder.forward`),
# across `LlavaModel.forward` (which calls `self.language_model(...)` with its own arguments).
# From the decoder on, the inputs travel as an argument.
INPUTS: contextvars.ContextVar[Optional[LlmInputs]] = contextvars.ContextVar("tome_plus_llm", default=None)


class CompiledFlag:
    """A flag per context, as a `ContextVar`, but one `torch.compile` can follow: dynamo does not
    trace `ContextVar.get`, so inside a compiled region the flag is a plain attribute (one
    compiled generate at a time, as HF's own output capture does)."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[bool] = contextvars.ContextVar(name, default=False)
        self._compiled = False

    def get(self) -> bool:
        return self._compiled or (not is_compiling() and self._var.get())

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        if is_compiling():
            before, self._compiled = self._compiled, True
            try:
                yield
            finally:
                self._compiled = before
            return
        token = self._var.set(True)
        try:
            yield
        finally:
            self._var.reset(token)


# ROUTING: a tome_plus decoder forward is running, so its attention modules read the routed backend
# (`attention.RoutedAttention`); outside one their config is the model's own, as user code and
# HF's checks read it.
ROUTING = CompiledFlag("tome_plus_routing")


@contextlib.contextmanager
def calling(**fields) -> Iterator[LlmCall]:
    """Within the block, `CALL` is the enclosing call's with `fields` replaced."""
    call = replace(CALL.get(), **fields)
    token = CALL.set(call)
    try:
        yield call
    finally:
        CALL.reset(token)


def current_inputs() -> Optional[LlmInputs]:
    """The `LlmInputs` of the VLM forward running now (None outside one): what a hook on the
    language model reads to run it alone later as inside that forward (`running_with`)."""
    return INPUTS.get()


@contextlib.contextmanager
def running_with(inputs: LlmInputs) -> Iterator[LlmInputs]:
    """Within the block the language model, called alone, runs as inside the VLM forward that
    built `inputs` (a copy with fresh records of what each site kept): `tome-plus bench --hf`
    times the LLM alone this way."""
    token = INPUTS.set(replace(inputs, kept=[], positions=[]))
    try:
        yield INPUTS.get()
    finally:
        INPUTS.reset(token)


@contextlib.contextmanager
def collecting() -> Iterator[List[LlmInputs]]:
    """ATP training: LLaVA forwards within the block run the modules' soft masks (nothing removed)
    and append their `LlmInputs` to the list yielded (`kept_fraction` is the budget loss's input)."""
    collected: List[LlmInputs] = []
    with calling(collect=collected):
        yield collected
