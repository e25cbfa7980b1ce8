"""Per-forward token state.

A `TokenState` is created at the start of each forward and handed from block to block; every
reduction returns a new one instead of mutating the old. That keeps gradient checkpointing
(blocks are re-run in backward), re-entrant calls and direct calls of `forward_features` correct:
nothing outlives the forward except the final state the model keeps for `tome_plus.inspect`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .methods.base import Reducer


@dataclass(frozen=True)
class TokenState:
    """What the blocks need to know about the tokens of one forward.

    Attributes:
        reducer: the method's reducer (shared by all forwards of a patched model).
        removals: tokens to remove after each block, for this input size.
        n_prefix: protected prefix tokens (class, distillation, registers), always first.
        has_cls: whether the first prefix token is a class token.
        prop_attn: add `log(size)` to the attention logits of every key.
        size: `[B, N, 1]` float32 count of input tokens each token stands for; `None` while all
            sizes are one (then no attention bias is needed and fused attention runs unmasked).
        log_size: `[B, N]` float32 `log(size) * log_size_scale` when proportional attention is on
            and something merged: the extra key channel of `prop_attn.py`, written by the merge.
        log_size_scale: `1 / scale` of the model's attention (so `scale * k'_D = log s`); None
            when the backend runs proportional attention as a mask (no channel to write).
        source: `[B, N0]` long, for each input token the index of the token that now holds it
            (-1 once pruned); `None` unless traced. A compact form of ToMe's binary `[B, N, N0]`
            source map, which `binary_source` rebuilds.
        batch, n_input: batch size and tokens entering the first block.
        device: where the tokens live (for tensors `inspect` makes when nothing merged).
        layer: index of the next block.
        counts: tokens after each block run so far.
        head: the running state of a head that follows the blocks (`heads/`, e.g. CLCA's cache),
            or None; `prenorm_layer` hands it each layer's output (`after_layer`).
    """

    reducer: "Reducer"
    removals: Tuple[int, ...]
    n_prefix: int
    has_cls: bool
    prop_attn: bool
    batch: int
    n_input: int
    device: Optional[torch.device] = None
    log_size_scale: Optional[float] = None
    size: Optional[torch.Tensor] = None
    log_size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    layer: int = 0
    counts: Tuple[int, ...] = ()
    head: Optional[Any] = None

    def replace(self, **changes) -> "TokenState":
        return dataclasses.replace(self, **changes)

    def attn_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Proportional attention as an additive key bias `[B, 1, 1, N]`, or None when not needed."""
        if not self.prop_attn or self.size is None:
            return None
        return self.size.log().to(dtype).transpose(1, 2).unsqueeze(1)


def insert_tokens(x: torch.Tensor, state: TokenState, at: int, tokens: Sequence[torch.Tensor], protect: bool
                  ) -> Tuple[torch.Tensor, TokenState]:
    """Insert `tokens` (`[B, n_i, C]` each, size 1 each) at position `at` of `x`, in one copy;
    `protect`: they join the protected prefix (`at` must then be `state.n_prefix`), so no reducer
    touches them."""
    n = sum(t.shape[1] for t in tokens)
    at_end = at == x.shape[1]
    x = torch.cat([x[:, :at], *(t.to(x.dtype) for t in tokens), x[:, at:]], dim=1)

    def insert(t: torch.Tensor, value: float) -> torch.Tensor:
        if at_end:  # one launch
            return F.pad(t, (0, 0, 0, n) if t.dim() == 3 else (0, n), value=value)
        filler = torch.full((t.shape[0], n) + t.shape[2:], value, dtype=t.dtype, device=t.device)
        return torch.cat([t[:, :at], filler, t[:, at:]], dim=1)

    size, log_size, source = state.size, state.log_size, state.source
    if size is not None:
        size = insert(size, 1.0)
    if log_size is not None:  # log 1 = 0
        log_size = insert(log_size, 0.0)
    if source is not None and not at_end:  # input tokens held at or after `at` moved n places on
        source = torch.where(source >= at, source + n, source)
    return x, state.replace(size=size, log_size=log_size, source=source,
                            n_prefix=state.n_prefix + n if protect else state.n_prefix)


def initial_source(batch: int, n_tokens: int, device: torch.device) -> torch.Tensor:
    """Identity source map: input token j is held by token j."""
    return torch.arange(n_tokens, device=device).expand(batch, n_tokens).contiguous()


def binary_source(source: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Rebuild ToMe's `[B, N, N0]` 0/1 source map from the compact index map."""
    batch, n0 = source.shape
    out = torch.zeros(batch, n_tokens + 1, n0, device=source.device)
    # pruned input tokens (-1) land in a spare last row that is cut off
    rows = torch.where(source < 0, n_tokens, source)
    out.scatter_(1, rows.unsqueeze(1), 1.0)
    return out[:, :n_tokens]
