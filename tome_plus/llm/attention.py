"""How the attention of a patched language model runs: its attention modules read one registered
HF attention function (`routed_attention`) that runs the model's own backend (fused kernels
stay) and, where asked, also forms the attention each token receives (`received_attention`:
float32, a block of queries at a time, so no `[N, N]` map is held) for an LLM method's site, and
lets a KV-cache policy score the new queries and mask the layers it pruned (`context.KV_STEP`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..precision import HALF, fp32_logits
from .context import KV_STEP, ROUTING
from .segments import additive

# The decoder layers are HF's own. Their attention modules read the backend named ROUTED while
# patched (`RoutedAttention`), and the decoder tells it per call, through keywords HF's layers
# hand through to the attention function (and which gradient checkpointing replays): BACKEND
# names the backend to run instead of the model's own; SCORE, in a layer a reducer scores after,
# asks for the attention the tokens receive (`ScoreRequest`). Without either (HF's own forward,
# where nothing is pruned) the model's own backend runs.
ROUTED = "tome_plus"
SCORE = "tome_plus_score"
BACKEND = "tome_plus_backend"
RECORD = "tome_plus_record"  # output_attentions: a dict the layer's probabilities go to (by layer index)
# Logits per block of queries in `received_attention` and the KV engine (8 MiB in float32): a block
# that fits a CPU's last-level cache, and stays under glibc's largest mmap threshold (32 MiB), so
# its allocation is reused instead of mapped afresh and page-faulted in for every block
BLOCK = 1 << 21


@dataclass(eq=False)
class ScoreRequest:
    """What a scoring layer's attention computes beside its output."""

    weights: torch.Tensor  # [B, R, N] per-query weights (`LlmReducer.query_weights`)
    mask: torch.Tensor  # [B, 1, N, Lk] bool or additive: the layer's attention mask (`segment_mask`)
    first: Union[int, torch.Tensor] = 0  # the key slot of the first of the N current tokens
    received: Optional[torch.Tensor] = None  # [B, R, N], filled in: `methods.base.received`
    query: Optional[torch.Tensor] = None  # [B, R]: the one query each weighting counts (`one_query`), or None
    causal: bool = False  # no query sees a later slot than its own (`received_attention`)


def grouped_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """`[B, KV, G, R, Lk]` float32 logits of query heads `[B, H, R, D]` against the keys of their KV
    heads `[B, KV, Lk, D]` (grouped-query attention: query head h reads KV head h // G): each KV
    head's G query heads as one block of rows, so K is never copied per query head. A half model's
    logits accumulate in float32 (`precision.py`); float32's are the unpatched layer's product."""
    batch, heads, rows, dim = query.shape
    kv = key.shape[1]
    grouped = query.reshape(batch, kv, heads // kv * rows, dim)
    if query.dtype in HALF:
        logits = fp32_logits(grouped, key, scaling)
    else:  # scaled in place: the product is this call's own, so no second block is allocated
        logits = (grouped @ key.transpose(-2, -1)).float().mul_(scaling)
    return logits.view(batch, kv, heads // kv, rows, key.shape[2])


def received_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float,
                       weights: torch.Tensor, first: Union[int, torch.Tensor] = 0,
                       one: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """`methods.base.received` from q and k (`[B, H, N, D]`, `[B, KV, Lk, D]` after rotary, the
    N current tokens' keys at slots `first ..`): float32 probabilities (a half model's too,
    `precision.py`), formed a block of queries at a time, so the memory is one block's logits
    however long the prompt. `one` (`[B, R]`): where each weighting counts one query alone, only
    those queries' probabilities are formed (gathered on the device: no host sync). `causal`: the
    mask lets no query see a later slot than its own (not Gemma 3's both-ways image blocks), so a
    block's keys stop at its last query's slot."""
    batch, heads, n, _ = query.shape
    current = first + torch.arange(n, device=query.device)  # a static cache's buffer has slots after them
    keys = key.shape[2]
    if one is not None:
        rows = one.shape[1]
        q = query.gather(2, one.view(batch, 1, rows, 1).expand(batch, heads, rows, query.shape[-1]))
        logits = grouped_logits(q, key, scaling).view(batch, heads, rows, keys)
        block = mask[..., :keys].gather(2, one.view(batch, 1, rows, 1).expand(batch, mask.shape[1], rows, keys))
        logits = logits + (additive(block, logits.dtype) if block.dtype == torch.bool else block.float())
        probs = logits.softmax(dim=-1).index_select(-1, current)  # [B, H, R, n]: weighting r's query
        weight = weights.gather(2, one.unsqueeze(-1))  # [B, R, 1]
        return probs.mean(dim=1) * weight
    step = max(1, BLOCK // (batch * heads * keys))
    total = weights.new_zeros(batch, weights.shape[1], n, dtype=torch.float32)
    for start in range(0, n, step):
        q = query[:, :, start:start + step]
        rows = q.shape[2]
        # under a causal mask no query of the block sees a key past the block's last slot: those
        # columns would be masked to zero probability, so they are never formed
        end = first + start + rows if causal and isinstance(first, int) else keys
        logits = grouped_logits(q, key[:, :, :end], scaling).view(batch, heads, rows, end)
        block = mask[:, :, start:start + step, :end]
        if block.dtype == torch.bool:  # in place: adding the dtype's minimum, as `additive` would
            logits.masked_fill_(~block, torch.finfo(logits.dtype).min)
        else:
            logits += block.float()
        probs = logits.softmax(dim=-1)
        if isinstance(first, int):  # the current tokens' keys are the slots first .. (a view)
            probs = probs[..., first:first + n]
        else:
            probs = probs.index_select(-1, current)
        # sum over the block's queries per head as one matmul, then the mean over heads
        total[..., :probs.shape[-1]] += (weights[:, None, :, start:start + step].float() @ probs).mean(dim=1)
    return total


def routed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    """The attention function of a patched language model (an HF attention interface): BACKEND if
    given, else the model's own backend; asked to (SCORE), it also fills in the request."""
    request, backend, record = kwargs.pop(SCORE, None), kwargs.pop(BACKEND, None), kwargs.pop(RECORD, None)
    scaling = module.scaling if scaling is None else scaling
    kv = KV_STEP.get()
    if kv is not None:  # a KV-cache policy scores the new queries; a pruned layer takes its own mask
        attention_mask = kv.attention(module, query, key, attention_mask, scaling)
    if request is not None:
        request.received = received_attention(query, key, request.mask, scaling, request.weights, request.first,
                                              request.query, request.causal)
    backend = backend or module.__dict__["config"]._attn_implementation
    if backend == "eager":  # HF's default, which its modules pass in and which no registry holds
        out = eager_attention(query, key, value, attention_mask, scaling, dropout, module.training)
    else:
        function = ALL_ATTENTION_FUNCTIONS.get_interface(backend, None)
        out = function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if record is not None and out[1] is not None:  # (a fused backend returns no probabilities, as unpatched)
        record[module.layer_idx] = out[1]
    return out


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                    scaling: float, dropout: float, training: bool):
    """HF's eager attention (its families' `eager_attention_forward`, which the modules pass in as
    the default and no registry holds): output `[B, N, H, D]` and probabilities."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = (query @ key.transpose(-2, -1)) * scaling
    if mask is not None:
        logits = logits + mask[..., :key.shape[2]]
    weights = logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    out = F.dropout(weights, dropout, training) @ value
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ROUTED, routed_attention)


class _RoutedView:
    """The config a patched attention module sees: the model's, but for its backend."""

    _attn_implementation = ROUTED

    def __init__(self, config) -> None:
        self.__dict__["_config"] = config

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_config"], name)


class RoutedAttention:
    """Mixin for the attention modules of a patched language model: their backend is ROUTED while
    a tome_plus decoder forward runs (`context.ROUTING`); elsewhere their config is the model's,
    so what user code and HF read there is the backend the user chose."""

    @property
    def config(self):
        config = self.__dict__["config"]
        return _RoutedView(config) if ROUTING.get() else config

    @config.setter
    def config(self, value) -> None:
        self.__dict__["config"] = value

    def forward(self, *args, **kwargs):
        if BACKEND not in kwargs or ROUTING.get():
            return super().forward(*args, **kwargs)
        # a layer the decoder called (it names the backend) whose forward runs again outside the
        # decoder's: gradient checkpointing's recompute, in the backward pass
        with ROUTING.on():
            return super().forward(*args, **kwargs)
