"""The reduce step every backend shares: attention that also yields a method's signals, the plan,
and its application to the tokens.

A backend says how q, k, v come out of its layer (`QKV`) and where its residual branches are
(`prenorm_layer`'s callables); everything between (which attention to run, which signals to
collect, when to call the method, what to do with the plan) lives here once, so a timm block, an
HF encoder layer and, later, an LLM decoder layer reduce in exactly the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .merging import apply_plan
from .precision import fp32_logits, selection_precision
from .prop_attn import split_padded, write_size_channel
from .state import TokenState

Signals = Dict[str, torch.Tensor]

# Devices where proportional attention runs as the size channel (`prop_attn.py`). On CUDA the
# channel keeps SDPA's fused kernels, which an additive mask leaves (3x, shared/perf); on CPU it
# is the padded head dim that leaves the fast path: SDPA at B8 H12 N150 D64, 2 threads, takes
# 14.1 ms plain, 14.7 ms with the `[B, 1, 1, N]` mask and 48.8 ms with q/k padded to 72, so the
# mask runs there. Same logits either way (`tests/test_prop_attn.py`).
CHANNEL_DEVICES = frozenset({"cuda"})


@dataclass(frozen=True)
class QKV:
    """How one attention layer projects its input, for `attention_with_signals`.

    Attributes:
        project: `x -> (q, k, v)`, each `[B, H, N, D]` (q and k after any qk-norm).
        padded: `() -> (weight, bias)` of the one GEMM that writes the size-channel layout
            (`prop_attn.pad_qkv`); None where the channel cannot run (qk-norm).
        heads, head_dim: H and D.
        scale: the attention scale (q k^T scale).
        dropout: attention dropout probability in effect (0 in eval).
        sdpa_scale: what the unpatched layer passes to SDPA as `scale` (None: SDPA's default),
            so that an unreduced layer computes bit for bit what the original does.
    """

    project: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    padded: Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]]
    heads: int
    head_dim: int
    scale: float
    dropout: float = 0.0
    sdpa_scale: Optional[float] = None


def attention_with_signals(x: torch.Tensor, state: TokenState, needs: FrozenSet[str], qkv: QKV,
                           size_channel: bool = True) -> Tuple[torch.Tensor, Signals]:
    """Multi-head attention of `x` (`[B, N, C]`, already normed) -> (`[B, N, H D]`, signals).

    Fused SDPA unless `"attn"` is needed; `"cls_attn"` costs one extra `q_cls K^T` row; `"k"` (the
    per-head keys, a view) is free and `"keys"` (their head average) one mean. Proportional
    attention runs as the extra q/k channel of `prop_attn.py` where a log-size channel exists, the
    layer allows it (`size_channel`, `qkv.padded`) and the device gains by it (`CHANNEL_DEVICES`),
    as an additive key bias otherwise.
    """
    batch, n_tokens, _ = x.shape
    channel = (size_channel and x.device.type in CHANNEL_DEVICES and qkv.padded is not None
               and state.log_size is not None and "attn" not in needs)
    bias = None
    if channel:
        weight, qkv_bias = qkv.padded()
        q, k, v = split_padded(F.linear(x, weight, qkv_bias), qkv.heads, qkv.head_dim)
        write_size_channel(k, qkv.head_dim, state.log_size)
        sdpa_scale = qkv.scale  # the padded head dim would change SDPA's default
    else:
        sdpa_scale = qkv.sdpa_scale
        q, k, v = qkv.project(x)
        bias = state.attn_bias(x.dtype)

    signals: Signals = {}
    if "attn" in needs:
        # the probabilities are a signal: float32 whatever the model's precision (`precision.py`);
        # the layer's output is computed from them in the model's dtype
        logits = fp32_logits(q, k, qkv.scale)
        if bias is not None:
            logits = logits + state.attn_bias(torch.float32)
        probs = logits.softmax(dim=-1)
        signals["attn"] = probs
        probs = probs.to(v.dtype)
        out = F.dropout(probs, qkv.dropout) @ v if qkv.dropout else probs @ v
    else:
        # with the size channel, q'k' already carries log s
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=qkv.dropout, scale=sdpa_scale)
        if "cls_attn" in needs:
            logits = fp32_logits(q[:, :, :1], k, qkv.scale)
            if bias is not None:
                logits = logits + state.attn_bias(torch.float32)
            signals["cls_attn"] = logits.softmax(dim=-1)[:, :, 0]
    k = k[..., :qkv.head_dim]
    if "k" in needs:
        signals["k"] = k
    if "keys" in needs:  # accumulated and kept in float32: a signal, and only [B, N, D]
        signals["keys"] = k.mean(dim=1, dtype=torch.float32)
    return out.transpose(1, 2).reshape(batch, n_tokens, -1), signals


def reduce_step(x: torch.Tensor, state: TokenState, signals: Signals, n_remove: int
                ) -> Tuple[torch.Tensor, TokenState]:
    """signals -> the method's plan -> applied to x, sizes and source (one call per reducing layer).

    The plan runs with autocast off: its scores are formed in float32 from whatever dtype the
    signals have (`precision.py`), so a half-precision model chooses the tokens fp32 chooses."""
    with selection_precision(x.device):
        plan = state.reducer.plan(signals, state, n_remove)
    return apply_plan(plan, x, state)


def prenorm_layer(x: torch.Tensor, state: TokenState,
                  attention: Callable[[torch.Tensor, FrozenSet[str]], Tuple[torch.Tensor, Signals]],
                  mlp: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, TokenState]:
    """One pre-norm transformer layer that reduces where its method says.

    `attention(x, needs)` returns the attention branch's residual update (norm, attention, output
    projection, LayerScale, drop-path: the backend's business) and the signals; `mlp(x)` the MLP
    branch's. The method reduces between the two (`site == "attn"`, the ViT papers) or after the
    whole layer (`site == "block"`, with the layer's output as the `"x"` signal).
    """
    reducer, layer = state.reducer, state.layer
    n_remove = state.removals[layer]
    at_block = reducer.site == "block"
    needs = reducer.needs_at(layer) if n_remove > 0 else frozenset()
    y, signals = attention(x, needs - {"x"})
    x = x + y
    if n_remove > 0 and not at_block:
        if "x" in needs:
            signals["x"] = x
        x, state = reduce_step(x, state, signals, n_remove)
    x = x + mlp(x)
    if n_remove > 0 and at_block:
        signals["x"] = x
        x, state = reduce_step(x, state, signals, n_remove)
    if state.head is not None:  # e.g. CLCA: cache, append and collect after the layer
        x, state = state.head.after_layer(x, state)
    return x, state.replace(layer=layer + 1, counts=state.counts + (x.shape[1],))


def reduce_to(x: torch.Tensor, reducer, n_keep: int,
              signals_of: Callable[[torch.Tensor, torch.Tensor], Signals]
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Reduce each of G token sets (`x`: `[G, N, C]`, no protected tokens) to `n_keep` tokens in
    one place (a VLM's image features), as many steps as the method needs: a step removes at most
    what `reducer.max_remove` allows (a bipartite merge: half), so a larger cut repeats the step
    on its output, sizes accumulating, as ToMe's layers do.

    `signals_of(x, index)` gives a step's signals for the current tokens, `index` (`[G, N']`)
    naming the input token each stands at. Returns the reduced `[G, n_keep, C]`, that `index`
    (a merged token stands at its destination's place) and the sizes (`[G, n_keep, 1]`, None
    when pruning only); output order is the method's, not the input's.
    """
    sets, n, _ = x.shape
    steps: List[int] = []
    while n - sum(steps) > n_keep:
        step = min(n - sum(steps) - n_keep, reducer.max_remove(len(steps), n - sum(steps), 0))
        if step <= 0:
            raise ValueError(f"{reducer.name} cannot reduce {n} tokens to {n_keep}")
        steps.append(step)
    state = TokenState(reducer=reducer, removals=tuple(steps), n_prefix=0, has_cls=False, prop_attn=False,
                       batch=sets, n_input=n, device=x.device)
    index = torch.arange(n, device=x.device).expand(sets, n)
    for layer, n_remove in enumerate(steps):
        signals = signals_of(x, index)
        state = state.replace(layer=layer)
        with selection_precision(x.device):
            plan = reducer.plan(signals, state, n_remove)
        x, state = apply_plan(plan, x, state)
        index = index.gather(1, plan.keep)
    return x, index, state.size
