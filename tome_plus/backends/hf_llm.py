"""HF transformers backend: the language model of a LLaVA-style model (Llama-family decoders:
`LlamaModel` and the models built like it), where methods prune visual tokens between layers.

Every method that prunes inside the language model (ATP, FastV) runs through one loop
(`PruningDecoder`) and one contract (`methods.base.LlmReducer`): after each of its `sites` the
attention the tokens received, summed with the method's `query_weights`, and the hidden states go
to its `select` (an `LlmSite`), which says which tokens stay. Below, "a module" stands for a
pruning site.

A patched decoder runs HF's own decoder layers and prunes between them. Before the first module
the layers see what HF gives them (its causal mask, its rotary embeddings). Every layer attends
with the model's own backend (`routed_attention`, registered as an HF attention function); a
layer a module scores after also forms, a block of queries at a time, the attention each token
receives (`received_attention`, float32), so no `[N, N]` attention map is held and the fused
kernels stay. The module keeps per instance the tokens it decides on and drops the others
physically: the survivors are gathered to the right (left padding, so every row's last token
stays last) with their hidden states, position ids and rotary angles, and every later layer
attends with a mask of its own (padding slots as keys never, causal by slot order, which is
position order), built in the form the backend takes (`layer_mask`). Counts differ per
instance; rows are padded to the batch's largest count. HF's gradient checkpointing and
`output_hidden_states` work as unpatched (a pruned token's hidden states are zeros from the
layer after its site on; the last is the normed output, as HF ties it); `output_attentions` is
refused.

The KV cache of a layer after a module holds that segment's tokens only. Which of its slots are
real is stored on the cache object itself (it travels with `generate`), so decoding steps and
later turns attend to exactly what each layer kept. The output hidden states are scattered back
to the input's positions (zeros where a token was pruned), so logits and labels line up as
unpatched.

In training the modules' soft masks enter every later layer's attention as `log(m)` on the keys
(the tokens stay; shapes are static), and the layer-averaged kept fraction is left for the
budget loss.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function,
                                        create_causal_mask, eager_mask, flash_attention_mask,
                                        flex_attention_mask, sdpa_mask)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..methods.base import LlmSite, received
from ..precision import HALF, fp32_logits
from ..reduce import reduce_to
from ..warn import warn_caller
from .base import PatchInfo, get_info

CACHE_ATTR = "_tome_plus_segments_valid"  # per segment after a pruning site: [B, P] which cached slots are real


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


# The two context variables below carry per-call data across HF's own code, where no argument
# can: transformers' `**kwargs` reach the vision tower and the loss as well, and `generate` refuses
# arguments its model does not name. Nested and concurrent calls each see their own.
#
# CALL: from our outer entry points (`FittingLlava.generate`, `FittingLlava.forward`,
# `collecting`) to `FittingInner.forward`, across `GenerationMixin.generate` and
# `LlavaForConditionalGeneration.forward` (which calls `self.model(...)` without the labels).
CALL: contextvars.ContextVar[LlmCall] = contextvars.ContextVar("tome_plus_llm_call", default=LlmCall())
# KV_STEP: a KV-cache policy's state for the current decoder forward (`tome_plus.kv`), to the
# routed attention of every layer (which scores the new queries and masks pruned layers).
KV_STEP: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("tome_plus_kv_step", default=None)
# SCOPE: the `LlmInputs` `FittingInner.forward` built, to the decoder (`PruningDecoder.forward`),
# across `LlavaModel.forward` (which calls `self.language_model(...)` with its own arguments).
# From the decoder on, the inputs travel as an argument.
SCOPE: contextvars.ContextVar[Optional[LlmInputs]] = contextvars.ContextVar("tome_plus_llm", default=None)


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
    return SCOPE.get()


@contextlib.contextmanager
def running_with(inputs: LlmInputs) -> Iterator[LlmInputs]:
    """Within the block the language model, called alone, runs as inside the VLM forward that
    built `inputs` (a copy with fresh records of what each site kept): `tome-plus bench --hf`
    times the LLM alone this way."""
    token = SCOPE.set(replace(inputs, kept=[], positions=[]))
    try:
        yield SCOPE.get()
    finally:
        SCOPE.reset(token)


@contextlib.contextmanager
def collecting() -> Iterator[List[LlmInputs]]:
    """ATP training: LLaVA forwards within the block run the modules' soft masks (nothing removed)
    and append their `LlmInputs` to the list yielded (`kept_fraction` is the budget loss's input)."""
    collected: List[LlmInputs] = []
    with calling(collect=collected):
        yield collected


@dataclass
class Segment:
    """The current tokens of one stretch of layers (all rows padded to the same count K)."""

    index: torch.Tensor  # [B, K] input position of each slot
    valid: torch.Tensor  # [B, K] bool: a real token (not padding)
    positions: torch.Tensor  # [B, K] position ids
    cos: torch.Tensor  # [B, K, D] rotary angles
    sin: torch.Tensor
    visual: torch.Tensor  # [B, K] bool
    spatial: torch.Tensor  # [B, K] float
    instruction: torch.Tensor  # [B, K] bool: text after the image
    prompt: torch.Tensor  # [B, K] bool: the prompt's real tokens (FastV's queries)
    key_bias: Optional[torch.Tensor] = None  # [B, K] log soft mask (training)


DECODERS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen2VLTextModel", "Qwen2_5_VLTextModel")  # whose decoder layers the loop below has been checked on


def matches_decoder(model: nn.Module) -> bool:
    """A Llama-family decoder (Llama, Mistral, Qwen2) without a sliding window in use: the masks
    built here after a pruning site know no window."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layers = getattr(model, "layers", None)
    return (any(c.__name__ in DECODERS for c in type(model).__mro__) and not window and layers is not None
            and len(layers) > 0)


# The decoder layers are HF's own. Their attention modules read the backend named ROUTED while
# patched (`RoutedAttention`), and the decoder tells it per call, through keywords HF's layers
# hand through to the attention function (and which gradient checkpointing replays): BACKEND
# names the backend to run instead of the model's own; SCORE, in a layer a reducer scores after,
# asks for the attention the tokens receive (`ScoreRequest`). Without either (HF's own forward,
# where nothing is pruned) the model's own backend runs.
ROUTED = "tome_plus"
SCORE = "tome_plus_score"
BACKEND = "tome_plus_backend"
BLOCK = 1 << 24  # logits per block of queries in `received_attention` (64 MiB in float32)


@dataclass(eq=False)
class ScoreRequest:
    """What a scoring layer's attention computes beside its output."""

    weights: torch.Tensor  # [B, R, N] per-query weights (`LlmReducer.query_weights`)
    mask: torch.Tensor  # [B, 1, N, P + N] bool or additive: the layer's attention mask (`segment_mask`)
    received: Optional[torch.Tensor] = None  # [B, R, N], filled in: `methods.base.received`


def received_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float,
                       weights: torch.Tensor) -> torch.Tensor:
    """`methods.base.received` from q and k (`[B, H, N, D]`, `[B, KV, P + N, D]` after rotary):
    float32 probabilities (a half model's too, `precision.py`), formed a block of queries at a
    time, so the memory is one block's logits however long the prompt."""
    batch, heads, n, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # grouped-query attention: kv head h // groups
    keys = key.shape[2]
    step = max(1, BLOCK // (batch * heads * keys))
    total = weights.new_zeros(batch, weights.shape[1], n, dtype=torch.float32)
    for start in range(0, n, step):
        q = query[:, :, start:start + step]
        logits = fp32_logits(q, key, scaling) if q.dtype in HALF else (q @ key.transpose(-2, -1)).float() * scaling
        block = mask[:, :, start:start + step, :keys]
        logits = logits + (_additive(block, logits.dtype) if block.dtype == torch.bool else block.float())
        total = total + received(logits.softmax(dim=-1), weights[:, :, start:start + step], current=n)
    return total


def routed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    """The attention function of a patched language model (an HF attention interface): BACKEND if
    given, else the model's own backend; asked to (SCORE), it also fills in the request."""
    request, backend = kwargs.pop(SCORE, None), kwargs.pop(BACKEND, None)
    scaling = module.scaling if scaling is None else scaling
    kv = KV_STEP.get()
    if kv is not None:  # a KV-cache policy scores the new queries; a pruned layer takes its own mask
        attention_mask = kv.attention(module, query, key, attention_mask, scaling)
    if request is not None:
        request.received = received_attention(query, key, request.mask, scaling, request.weights)
    backend = backend or module.__dict__["config"]._attn_implementation
    if backend == "eager":  # HF's default, which its modules pass in and which no registry holds
        return eager_attention(query, key, value, attention_mask, scaling, dropout, module.training)
    function = ALL_ATTENTION_FUNCTIONS.get_interface(backend, None)
    return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


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
    """Mixin for the attention modules of a patched language model: their backend is ROUTED."""

    @property
    def config(self):
        return _RoutedView(self.__dict__["config"])

    @config.setter
    def config(self, value) -> None:
        self.__dict__["config"] = value


def mask_builder(backend: str) -> Callable:
    """HF's mask function for `backend`, one of the four forms the masks built here after a pruning
    site take: eager's additive 4-D, SDPA's bool 4-D, flex attention's BlockMask, flash
    attention's 2-D padding mask."""
    builder = eager_mask if backend == "eager" else ALL_MASK_ATTENTION_FUNCTIONS.get(backend)
    if builder not in (eager_mask, sdpa_mask, flex_attention_mask, flash_attention_mask):
        raise ValueError(f"attention backend {backend!r} takes a mask tome_plus does not know how to build after a "
                         f"pruning site; use eager, sdpa, flex_attention or a flash_attention_* backend")
    return builder


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def layer_mask(past_valid: torch.Tensor, seg: "Segment", dtype: torch.dtype, backend: str):
    """A segment's mask in the form `backend`'s layers take. Flash and flex attention get HF's own
    (a padding mask over the real slots, causal from the right: the same attention, since slot
    order is position order); eager and SDPA `segment_mask`, whose padding rows see themselves
    (an SDPA row with no key gives NaN, which would reach real rows through the values)."""
    builder = mask_builder(backend)
    keys = torch.cat([past_valid, seg.valid], dim=1)
    if seg.key_bias is not None and builder not in (eager_mask, sdpa_mask):
        raise ValueError(f"ATP's soft masks (training) need a 4-D float attention mask, which {backend} does not "
                         f"take: train with attn_implementation='sdpa' or 'eager'")
    if builder in (flex_attention_mask, flash_attention_mask):
        batch, k = seg.valid.shape
        return builder(batch_size=batch, q_length=k, kv_length=keys.shape[1], q_offset=past_valid.shape[1],
                       mask_function=causal_mask_function, attention_mask=keys, device=keys.device)
    mask = segment_mask(past_valid, seg, dtype)
    return _additive(mask, dtype) if builder is eager_mask and mask.dtype == torch.bool else mask


def segment_mask(past_valid: torch.Tensor, seg: Segment, dtype: torch.dtype) -> torch.Tensor:
    """`[B, 1, K, P + K]` mask of a segment: cached slots and earlier slots that are real, causal
    by slot order, each slot always seeing itself (padding rows stay finite); float with the
    soft masks' log on the keys."""
    batch, k = seg.valid.shape
    p = past_valid.shape[1]
    keys = torch.cat([past_valid, seg.valid], dim=1)
    slot = torch.arange(k, device=keys.device)
    causal = torch.arange(p + k, device=keys.device).unsqueeze(0) <= (p + slot).unsqueeze(1)
    mask = (keys.unsqueeze(1) & causal.unsqueeze(0))
    mask[:, slot, p + slot] = True
    mask = mask.unsqueeze(1)
    if seg.key_bias is None:
        return mask
    bias = torch.cat([seg.key_bias.new_zeros(batch, p), seg.key_bias], dim=1)
    return _additive(mask, dtype) + bias.to(dtype)[:, None, None, :]


def compact(h: torch.Tensor, seg: Segment, keep: torch.Tensor):
    """Drop the slots `keep` ([B, K] bool) rejects; survivors move right in order, rows padded
    on the left to the largest count."""
    counts = keep.sum(dim=1)
    n = int(counts.max())
    # stable sort by keep: dropped slots first, kept last, each in order; the last n are the
    # row's kept slots behind (n - count) dropped ones, which become padding
    order = keep.long().argsort(dim=1, stable=True)[:, -n:]
    occupied = torch.arange(n, device=h.device).unsqueeze(0) >= (n - counts).unsqueeze(1)
    take = lambda t: t.gather(1, order if t.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    seg = Segment(index=take(seg.index), valid=take(seg.valid) & occupied, positions=take(seg.positions),
                  cos=take(seg.cos), sin=take(seg.sin), visual=take(seg.visual) & occupied,
                  spatial=take(seg.spatial), instruction=take(seg.instruction) & occupied,
                  prompt=take(seg.prompt) & occupied,
                  key_bias=None if seg.key_bias is None else take(seg.key_bias))
    return take(h), seg


def instruction_after_image(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Text tokens after the first image token of their row (the instruction)."""
    seen = visual.long().cumsum(dim=1) > 0
    return seen & ~visual & valid




def method_at(method: str, site: str) -> str:
    """How a message names the method a language model runs, with its site: "'tome' at site='features'"."""
    return f"{method!r} at site={site!r}"


def warn_tokens_once(info: PatchInfo, detail: str) -> None:
    """A `tokens=N` budget above what an image of this forward has: one warning per patched model.
    Where the count depends on the image (anyres tiles, Qwen's native resolution) `patch` cannot
    refuse N as it does a count it knows, so the forward warns, as timm's does at other input sizes."""
    if not info.parts.tokens_checked:
        info.parts.tokens_checked = True
        warn_caller(f"tokens={info.config.tokens} {detail} (warned once per patch)")


def check_tokens_per_row(info: PatchInfo, n_visual: torch.Tensor, images: torch.Tensor) -> None:
    """FastV's `tokens=N` per image: warn (once) where a row has fewer than N per image to rank."""
    if info.parts.tokens_checked:  # no host sync where checked at `patch` or warned already
        return
    short = (images * info.config.tokens > n_visual).nonzero()
    if short.numel():
        row = int(short[0, 0])
        warn_tokens_once(info, f"per image is more than row {row} of this forward has ({int(n_visual[row])} visual "
                               f"tokens for {int(images[row])} image(s)): {info.method!r} keeps all of them")


def feature_count(config, reducer, n: int) -> int:
    """Tokens an image's (or a clip's) `n` reducible features keep under the features site's budget:
    `tokens` (at most n), `keep` (the method's rounding) or `r` (removed); at least one stays."""
    kind, value = config.budget
    if kind == "tokens":
        return min(value, n)
    if kind == "keep":  # a small image or clip keeps one token at least
        return max(n - reducer.keep_removal(n, value), 1)
    return max(n - value, 1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as the Llama family applies it (`[G, H, N, D]`, angles `[G, N, D]`)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + turned * sin.unsqueeze(1)


def image_attention(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`[G, H, N, N]` float32 attention among each set's tokens (`x`: `[G, N, D]` embeddings) in
    the decoder's first layer, every token seeing every other (no causal order): Zero-TPrune's
    attention graph at the features site."""
    attn = layer.self_attn
    x = layer.input_layernorm(x)
    sets, n, _ = x.shape
    q = attn.q_proj(x).view(sets, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(sets, n, -1, attn.head_dim).transpose(1, 2)
    q, k = rotate(q, cos.to(q.dtype), sin.to(q.dtype)), rotate(k, cos.to(k.dtype), sin.to(k.dtype))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return fp32_logits(q, k, attn.scaling).softmax(dim=-1)


def reduce_features(model: nn.Module, h: torch.Tensor, seg: "Segment", scope: LlmInputs, info
                    ) -> "tuple[torch.Tensor, torch.Tensor]":
    """The features site: each image's (or video's) visual tokens, newlines aside, reduced by a
    vision method (`reduce.reduce_to`) before the first decoder layer. Returns the hidden states
    (a merged token written at its destination's place) and `[B, L]` which slots stay; a kept
    token keeps its position (and M-RoPE angles), a merged one its destination's."""
    reducer, config = info.reducer, info.config
    reducible = seg.visual & (scope.runs >= 0)
    if scope.newline is not None:
        # the newline as the features carry it: the parameter, rounded to the features' dtype where
        # they came out in half precision (autocast) and were scattered into wider embeddings
        for dtype in (h.dtype, torch.bfloat16, torch.float16):
            reducible &= ~(h == scope.newline.to(dtype).to(h.dtype)).all(dim=-1)
    scope.newlines = (seg.visual & ~reducible).sum(dim=1)
    keep = ~reducible
    rows, cols = reducible.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return h, keep
    # one run per image: runs of a row are in column order, so equal keys are consecutive
    key = rows * (h.shape[1] + 1) + scope.runs[rows, cols]
    counts = torch.unique_consecutive(key, return_counts=True)[1].tolist()
    if config.tokens is not None and config.tokens > min(counts):
        warn_tokens_once(info, f"is more than the {min(counts)} tokens (newlines aside) an image or video of this "
                               f"forward has at site='features': it keeps all of them")
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    by_length: dict = {}
    for start, n in zip(starts, counts):
        by_length.setdefault(n, []).append(start)
    h = h.clone()
    for n, group in by_length.items():
        at = torch.tensor(group, device=h.device).unsqueeze(1) + torch.arange(n, device=h.device)
        r, c = rows[at], cols[at]  # [G, n] each set's tokens
        n_keep = feature_count(config, reducer, n)
        if n_keep >= n:
            keep[r, c] = True
            continue

        def signals(x: torch.Tensor, index: torch.Tensor) -> dict:
            out = {"k": x.unsqueeze(1), "keys": x.float(), "x": x}
            if "attn" in reducer.needs:
                rr, cc = r.gather(1, index), c.gather(1, index)
                out["attn"] = image_attention(model.layers[0], x, seg.cos[rr, cc], seg.sin[rr, cc])
            return out

        x, index, _ = reduce_to(h[r, c], reducer, n_keep, signals)
        rr, cc = r.gather(1, index), c.gather(1, index)
        h[rr, cc] = x.to(h.dtype)
        keep[rr, cc] = True
    return h, keep


class PruningDecoder:
    """Mixin for a Llama-family decoder model (`LlamaModel`, ...): the one decoder loop of the
    features and llm sites, running any `LlmReducer` between its layers (`select` after each of
    its `sites`) or a vision method on the image features before the first.

    Falls back to the original forward where nothing is pruned: no image tokens in this forward
    and none pruned earlier in its cache."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        scope = SCOPE.get()
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        stored = getattr(cache, CACHE_ATTR, None) if cache is not None else None
        if (scope is None or not scope.has_visual) and stored is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if kwargs.get("output_attentions", self.config.output_attentions):
            # after a pruning site each row attends over its own kept tokens: no [L, L] map to return
            raise ValueError("output_attentions of the language model is not recorded while tokens are pruned inside "
                             "it; call tome_plus.unpatch(model) to get them")
        hidden = kwargs.get("output_hidden_states", self.config.output_hidden_states)
        if not isinstance(hidden, bool):
            raise ValueError(f"output_hidden_states={hidden!r}: while tokens are pruned inside the language model, "
                             f"its hidden states are returned all (True) or none")
        return self._pruning_forward(scope, stored, input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                 use_cache, hidden)

    def _pruning_forward(self, scope, stored, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                     output_hidden_states):
        info = get_info(self)
        # an LLM method prunes after the layers it names (`LlmReducer.sites`); a vision method
        # reduces the image features once, before the first layer
        reducer = info.reducer
        features = info.parts.site == "features"
        sites = () if features else reducer.sites(len(self.layers))
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"{method_at(info.method, info.parts.site)} keeps a different number of tokens per "
                             f"instance in each layer's cache, which a {type(cache).__name__} cannot hold; use the "
                             f"default dynamic cache (no cache_implementation=..., no pre-built static cache)")
        h = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        batch, n, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache, cache = False, None  # as HF's checkpointed layers do (a cache would not be replayed)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            # after the features site every layer's cache holds the reduced prompt: the mask
            # counts the conversation
            offset = past
            if features and stored is not None:
                if attention_mask is None:
                    raise ValueError("with image features reduced in the cache, a forward needs the attention_mask "
                                     "of the whole conversation (or position_ids) to place its tokens")
                offset = attention_mask.shape[1] - n
            position_ids = (torch.arange(n, device=h.device) + offset).unsqueeze(0)
        # multimodal rotary positions (Qwen2-VL: [3, B, N] temporal/height/width rows, or [4, B, N]
        # with the text positions first) reach the rotary embedding as given; the survivors keep
        # their angles (`compact` takes cos and sin), and the text row stands for their positions
        rope_ids = position_ids[1:] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else position_ids
        position_ids = (position_ids[0] if position_ids.dim() == 3 else position_ids).expand(batch, n)
        if isinstance(attention_mask, dict):
            raise ValueError("the language model got prepared attention masks (a dict); tome_plus prunes with the "
                             "[batch, length] padding mask: pass that")
        # before the first pruning site the layers take HF's mask; after it, one built here in the
        # form their backend takes (`layer_mask`)
        backend = self.config._attn_implementation
        if mask_builder(backend) is flex_attention_mask and h.device.type == "cpu":
            # torch's CPU flex kernel fails to compile for a mask that reads a tensor (a padded batch,
            # unpatched too): on a CPU these layers run SDPA over the same mask
            backend = "sdpa"
        # else every layer takes a mask built here
        hf_masks = backend == self.config._attn_implementation and not features
        hf_mask = None
        if hf_masks:
            hf_mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                                         cache=cache, position_ids=position_ids if rope_ids.dim() == 2 else None)
        cos, sin = self.rotary_emb(h, position_ids=rope_ids)
        full = attention_mask.bool() if attention_mask is not None else torch.ones(batch, past + n, dtype=torch.bool,
                                                                                  device=h.device)
        valid = full[:, -n:]
        visual = scope.visual if scope is not None and scope.has_visual else torch.zeros_like(valid)
        spatial = scope.spatial if scope is not None and scope.has_visual else torch.zeros(batch, n, device=h.device)
        seg = Segment(index=torch.arange(n, device=h.device).expand(batch, n), valid=valid, positions=position_ids,
                      cos=cos.expand(batch, -1, -1), sin=sin.expand(batch, -1, -1), visual=visual & valid,
                      spatial=spatial, instruction=instruction_after_image(visual, valid), prompt=valid)
        if scope is not None and scope.prompt_length is not None and past == 0:
            seg.instruction &= seg.index < scope.prompt_length
            seg.prompt = seg.prompt & (seg.index < scope.prompt_length)
        if scope is not None and scope.answer is not None and past == 0:
            seg.instruction &= ~scope.answer
        soft = scope is not None and scope.soft
        if soft and info.modules is None:
            raise ValueError(f"{info.method} has nothing to train: soft masks are ATP's (tome_plus.atp)")
        n_visual = seg.visual.sum(dim=1).float()
        kept_sum = torch.zeros(batch, device=h.device)  # soft: sum over layers of the visual fraction
        fraction_now = torch.ones(batch, device=h.device)
        alive = seg.visual  # soft: the visual tokens the hard rule would still keep
        kept_st = torch.ones(batch, n, device=h.device)  # soft: hard keep forward, soft mask backward
        segments_valid: List[torch.Tensor] = []  # this forward's slots, per segment after a module
        past_valid = full[:, :past]  # segment 0's cache: what HF's mask covers
        # output_hidden_states: the embeddings and each layer's output, at the input's positions
        states = [scatter_back(h, seg, n)] if output_hidden_states else []
        # a mask changes only at a pruning site: built once per segment (a flex BlockMask is costly)
        mask = hf_mask if hf_masks else layer_mask(past_valid, seg, h.dtype, backend)
        if features:  # a site before the first layer: every layer takes a mask built here
            if scope is not None and scope.has_visual:
                h, keep = reduce_features(self, h, seg, scope, info)
                h, seg = compact(h, seg, keep)
                scope.kept.append(seg.visual.sum(dim=1))
                scope.positions.append(torch.where(seg.valid, seg.positions, torch.full_like(seg.positions, -1)))
            past_valid = stored[0] if stored is not None else full[:, :past]
            segments_valid.append(seg.valid)
            mask = layer_mask(past_valid, seg, h.dtype, backend)
        for i, layer in enumerate(self.layers):
            site = i in sites
            explicit = site and scope is not None and scope.has_visual
            if explicit and past and getattr(cache.layers[i], "valid", None) is not None:
                # a KV policy pruned this layer's cache per head: the scoring mask, built per slot, no longer fits
                raise ValueError(f"{info.method} scores new visual tokens against a KV cache that kv={info.kv.name!r} "
                                 f"pruned; put each image in the prompt of its own generate call (a later turn's "
                                 f"images are not supported with a KV policy at site='llm')")
            extra = {BACKEND: backend}
            if explicit:
                request = ScoreRequest(reducer.query_weights(seg.visual, seg.instruction, seg.valid, seg.prompt),
                                       segment_mask(past_valid, seg, h.dtype))
                extra[SCORE] = request
            kv = KV_STEP.get()
            if kv is not None:  # a KV policy reads this layer's own slots
                kv.segments[i] = (past_valid, seg.valid)
            h = layer(h, attention_mask=mask, position_ids=seg.positions, cache=cache, use_cache=use_cache,
                      position_embeddings=(seg.cos, seg.sin), **extra)
            h = h[0] if isinstance(h, tuple) else h
            if output_hidden_states:
                states.append(scatter_back(h, seg, n))
            kept_sum = kept_sum + fraction_now
            if not site:
                continue
            if explicit:
                # in training, tokens the hard rule pruned earlier are no longer ranked, as at inference
                candidates = alive if soft else seg.visual
                if reducer.config.tokens is not None:
                    check_tokens_per_row(info, candidates.sum(dim=1), scope.images)
                keep = reducer.select(LlmSite(
                    layer=i, hidden=h, received=request.received, visual=seg.visual, candidates=candidates,
                    instruction=seg.instruction, valid=seg.valid, prompt=seg.prompt, spatial=seg.spatial,
                    images=scope.images, trainable=info.modules, soft=soft))
                if soft:
                    m = torch.where(candidates, keep, torch.ones_like(keep))
                    base = seg.key_bias if seg.key_bias is not None else torch.zeros_like(m)
                    seg = replace(seg, key_bias=base + m.clamp(min=1e-6).log())
                    hard = m > 0.5  # the inference rule: passes a threshold
                    alive = alive & hard
                    # the budget counts what inference keeps (hard forward), with the soft gradient
                    kept_st = kept_st * (hard.float() - m.detach() + m)
                    fraction_now = (kept_st * seg.visual).sum(dim=1) / n_visual.clamp(min=1)
                else:
                    h, seg = compact(h, seg, keep)
                    scope.kept.append(seg.visual.sum(dim=1))
                    scope.positions.append(torch.where(seg.valid, seg.positions, torch.full_like(seg.positions, -1)))
            # a cache filled by forwards that pruned nothing holds every earlier token in every layer
            past_valid = stored[len(segments_valid)] if stored is not None else full[:, :past]
            segments_valid.append(seg.valid)
            mask = layer_mask(past_valid, seg, h.dtype, backend)
        h = self.norm(h)
        if scope is not None and soft:  # rows without image tokens have no fraction (nan)
            scope.kept_fraction = torch.where(n_visual > 0, kept_sum / len(self.layers), torch.nan)
        if cache is not None:
            prior = stored if stored is not None else [full[:, :past]] * len(segments_valid)
            setattr(cache, CACHE_ATTR, [torch.cat([p, v], dim=1) for p, v in zip(prior, segments_valid)])
        out = scatter_back(h, seg, n)
        if output_hidden_states:
            return BaseModelOutputWithPast(last_hidden_state=out, cache=cache, hidden_states=(*states[:-1], out))
        return BaseModelOutputWithPast(last_hidden_state=out, cache=cache)


def scatter_back(h: torch.Tensor, seg: Segment, n: int) -> torch.Tensor:
    """`[B, n, D]` hidden states at the input's positions (zeros where a token was pruned)."""
    out = h.new_zeros(h.shape[0], n, h.shape[-1])
    return out.scatter(1, seg.index.unsqueeze(-1).expand_as(h), h)
