"""HF transformers backend: the language model of a LLaVA-style model (Llama-family decoders:
`LlamaModel` and the models built like it), where ATP and FastV prune visual tokens between layers.

Both run through the same loop: the reducer scores the visual tokens from one layer's attention
(`reducer.score`) and decides which stay (`reducer.decide`); ATP with its trainable modules after
the layers they name (`info.modules`), FastV after the one layer it names (`reducer.layers`).
Below, "a module" stands for either's pruning site.

A patched decoder runs its layers itself. Before the first ATP module the layers see what HF
gives them (its causal mask, its rotary embeddings). An ATP module after layer l reads that
layer's attention probabilities (explicit attention there only; SDPA everywhere else), keeps
per instance the tokens it decides on and drops the others physically: the survivors are
gathered to the right (left padding, so every row's last token stays last) with their hidden
states, position ids and rotary angles, and every later layer attends with a mask of its own
(padding slots as keys never, causal by slot order, which is position order). Counts differ per
instance; rows are padded to the batch's largest count.

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
import sys
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..precision import HALF, fp32_logits
from .base import get_info

CACHE_ATTR = "_tome_plus_atp_valid"  # per segment after a module: [B, P] which cached slots are real


@dataclass
class LlmInputs:
    """What the LLaVA forward tells its language model about the current tokens."""

    visual: torch.Tensor  # [B, L] bool: image tokens
    spatial: torch.Tensor  # [B, L] float: SAP grid score of each image token (0 elsewhere)
    has_visual: bool
    soft: bool = False
    per_image: Optional[int] = None  # visual tokens one image puts here (FastV's `tokens` per image)  # training: soft masks, nothing removed
    # generate without a cache re-runs prompt + generated tokens: only the prompt's text counts
    # as the instruction, so each step decides as the cached prefill did
    prompt_length: Optional[int] = None
    # training: the answer's tokens (labels != -100) are not part of the instruction that scores
    answer: Optional[torch.Tensor] = None
    # filled in by the decoder, for inspect and the training loss
    kept: List[torch.Tensor] = field(default_factory=list)  # per module: [B] visual tokens kept
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
# SCOPE: the `LlmInputs` `FittingInner.forward` built, to the decoder (`AtpDecoder.forward`),
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


DECODERS = ("LlamaModel", "MistralModel", "Qwen2Model")  # whose layers `run_layer` computes exactly


def matches_decoder(model: nn.Module) -> bool:
    """A decoder whose layers `run_layer` reimplements: Llama, Mistral and Qwen2 (pre-norm, q/k/v/o
    projections, rotary embeddings; no qk-norm, no sliding window in use, no embedding scaling)."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layers = getattr(model, "layers", None)
    return (any(c.__name__ in DECODERS for c in type(model).__mro__) and not window and layers is not None
            and len(layers) > 0 and not hasattr(layers[0].self_attn, "q_norm"))


def _family(layer: nn.Module):
    """The layer's own modeling module (for its `apply_rotary_pos_emb` and `repeat_kv`)."""
    return sys.modules[type(layer.self_attn).__module__]


def run_layer(layer: nn.Module, h: torch.Tensor, mask: Optional[torch.Tensor], cos: torch.Tensor,
              sin: torch.Tensor, cache, want_probs: bool):
    """One decoder layer: SDPA, or explicit attention that also returns the probabilities."""
    attn, family = layer.self_attn, _family(layer)
    batch, n, _ = h.shape
    x = layer.input_layernorm(h)
    shape = (batch, n, -1, attn.head_dim)
    q, k, v = (p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = family.apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    k, v = family.repeat_kv(k, attn.num_key_value_groups), family.repeat_kv(v, attn.num_key_value_groups)
    dropout = attn.attention_dropout if attn.training else 0.0
    probs = None
    if want_probs:
        # the probabilities are ATP's signal: float32 for a half model too (`precision.py`); fp32
        # models keep HF's eager formula bit for bit
        logits = (q @ k.transpose(-2, -1)) * attn.scaling if q.dtype not in HALF else fp32_logits(q, k, attn.scaling)
        if mask is not None:
            logits = logits + (mask.float() if mask.dtype != torch.bool else _additive(mask, logits.dtype))
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        out = F.dropout(probs.to(v.dtype), dropout, attn.training) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scaling,
                                             is_causal=mask is None and n > 1)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, probs


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


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


class AtpDecoder:
    """Mixin for a Llama-family decoder model (`LlamaModel`, ...): runs ATP between its layers.

    Falls back to the original forward where nothing is pruned: no image tokens in this forward
    and none pruned earlier in its cache."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        asked = [name for name in ("output_attentions", "output_hidden_states") if kwargs.get(name)]
        if asked:  # HF's output recorders do not reach a patched decoder: refused rather than returned as None
            raise ValueError(f"{' and '.join(asked)} of the language model are not recorded while ATP is patched "
                             f"into it; call tome_plus.unpatch(model) to get them")
        scope = SCOPE.get()
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        stored = getattr(cache, CACHE_ATTR, None) if cache is not None else None
        if (scope is None or not scope.has_visual) and stored is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if self.gradient_checkpointing and self.training:
            raise ValueError("gradient checkpointing of the language model does not reach the layers ATP runs; "
                             "train without it (model.gradient_checkpointing_disable()) or unpatch")
        return self._atp_forward(scope, stored, input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                 use_cache)

    def _atp_forward(self, scope, stored, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache):
        info = get_info(self)
        # ATP: trainable modules after its layers; a method without them (FastV) names its layers
        atp, reducer = info.modules, info.reducer
        sites = atp.layers if atp is not None else reducer.layers(len(self.layers))
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"ATP keeps a different number of tokens per instance in each layer's cache, which a "
                             f"{type(cache).__name__} cannot hold; use the default dynamic cache (no "
                             f"cache_implementation=..., no pre-built static cache)")
        h = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        batch, n, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(n, device=h.device) + past).unsqueeze(0)
        position_ids = position_ids.expand(batch, n)
        # the layers run SDPA here whatever the model's attention backend: HF's mask is taken only
        # where it is the 4-D form SDPA reads (eager, sdpa); flash attention's 2-D padding mask and
        # flex attention's BlockMask give way to the mask built here (`segment_mask`), as after a module
        hf_masks = self.config._attn_implementation in ("eager", "sdpa")
        hf_mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache,
                                     position_ids=position_ids) if hf_masks else None
        cos, sin = self.rotary_emb(h, position_ids=position_ids)
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
        if soft and atp is None:
            raise ValueError(f"{info.method} has nothing to train: soft masks are ATP's (tome_plus.atp)")
        n_visual = seg.visual.sum(dim=1).float()
        kept_sum = torch.zeros(batch, device=h.device)  # soft: sum over layers of the visual fraction
        fraction_now = torch.ones(batch, device=h.device)
        alive = seg.visual  # soft: the visual tokens the hard rule would still keep
        kept_st = torch.ones(batch, n, device=h.device)  # soft: hard keep forward, soft mask backward
        segments_valid: List[torch.Tensor] = []  # this forward's slots, per segment after a module
        past_valid = full[:, :past]  # segment 0's cache: what HF's mask covers
        for i, layer in enumerate(self.layers):
            site = i in sites
            module = atp.at(i) if atp is not None else None
            explicit = site and scope is not None and scope.has_visual
            if hf_masks and not segments_valid and seg.key_bias is None and not explicit:
                mask = hf_mask
            else:
                mask = segment_mask(past_valid, seg, h.dtype)
            h, probs = run_layer(layer, h, mask, seg.cos, seg.sin, cache, explicit)
            kept_sum = kept_sum + fraction_now
            if not site:
                continue
            if explicit:
                score = reducer.score(probs, seg.visual, seg.instruction, seg.valid, seg.prompt)
                pooled = lambda m: (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
                # in training, tokens the hard rule pruned earlier leave the percentiles, as at inference
                ranked = alive if soft else seg.visual
                if atp is None:
                    keep = reducer.decide(score, ranked, scope.per_image)
                else:
                    keep = reducer.decide(module, bool(atp.trained), atp.fraction, score, seg.spatial, ranked,
                                          pooled(ranked.to(h.dtype)), pooled(seg.instruction.to(h.dtype)),
                                          soft=soft)
                if soft:
                    m = torch.where(ranked, keep, torch.ones_like(keep))
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
        h = self.norm(h)
        if scope is not None and soft:  # rows without image tokens have no fraction (nan)
            scope.kept_fraction = torch.where(n_visual > 0, kept_sum / len(self.layers), torch.nan)
        if cache is not None:
            prior = stored if stored is not None else [full[:, :past]] * len(segments_valid)
            setattr(cache, CACHE_ATTR, [torch.cat([p, v], dim=1) for p, v in zip(prior, segments_valid)])
        out = h.new_zeros(batch, n, h.shape[-1])
        out.scatter_(1, seg.index.unsqueeze(-1).expand_as(h), h)  # back to the input's positions
        return BaseModelOutputWithPast(last_hidden_state=out, cache=cache)
