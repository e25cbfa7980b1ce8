"""The decoder loop of a patched language model (Llama-family decoders: `LlamaModel` and the
models built like it), where the features and llm sites reduce visual tokens.

Every method that prunes inside the language model (ATP, FastV) runs through one loop
(`PruningDecoder`) and one contract (`methods.base.LlmReducer`): after each of its `sites` the
attention the tokens received, summed with the method's `query_weights`, and the hidden states go
to its `select` (an `LlmSite`), which says which tokens stay. Below, "a module" stands for a
pruning site. The features site is a site before layer 0 (`features.reduce_features`).

A patched decoder runs HF's own decoder layers and prunes between them. Before the first module
the layers see what HF gives them (its causal mask, its rotary embeddings). Every layer attends
with the model's own backend (`attention.routed_attention`, registered as an HF attention
function); a layer a module scores after also forms, a block of queries at a time, the attention
each token receives (`attention.received_attention`, float32), so no `[N, N]` attention map is
held and the fused kernels stay. The module keeps per instance the tokens it decides on and drops
the others physically: the survivors are gathered to the right (left padding, so every row's last
token stays last) with their hidden states, position ids and rotary angles, and every later layer
attends with a mask of its own (padding slots as keys never, causal by slot order, which is
position order), built in the form the backend takes (`segments.layer_mask`). Counts differ per
instance; rows are padded to the batch's largest count. HF's gradient checkpointing and
`output_hidden_states` work as unpatched (a pruned token's hidden states are zeros from the
layer after its site on; the last is the normed output, as HF ties it); `output_attentions` is
refused.

The KV cache of a layer after a module holds that segment's tokens only. Which of its slots are
real is stored on the cache object itself (`CACHED_SLOTS_ATTR`; it travels with `generate`), so
decoding steps and later turns attend to exactly what each layer kept. The output hidden states
are scattered back to the input's positions (zeros where a token was pruned), so logits and labels
line up as unpatched.

In training the modules' soft masks enter every later layer's attention as `log(m)` on the keys
(the tokens stay; shapes are static), and the layer-averaged kept fraction is left for the
budget loss.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, flex_attention_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..backends.base import PatchInfo, get_info
from ..methods.base import LlmSite
from .attention import BACKEND, SCORE, ScoreRequest
from .context import INPUTS, KV_STEP
from .decoders import decoder_adapter, rope_positions
from .features import reduce_features, warn_tokens_once
from .segments import Segment, compact, instruction_after_image, layer_mask, mask_builder, scatter_back, segment_mask

# on the cache object, per segment after a pruning site: `[B, P]` which of that segment's cached slots are real
CACHED_SLOTS_ATTR = "_tome_plus_segments_valid"
def method_at(method: str, site: str) -> str:
    """How a message names the method a language model runs, with its site: "'tome' at site='features'"."""
    return f"{method!r} at site={site!r}"


def check_tokens_per_row(info: PatchInfo, n_visual: torch.Tensor, images: torch.Tensor) -> None:
    """FastV's `tokens=N` per image: warn (once) where a row has fewer than N per image to rank."""
    if info.parts.tokens_checked:  # no host sync where checked at `patch` or warned already
        return
    short = (images * info.config.tokens > n_visual).nonzero()
    if short.numel():
        row = int(short[0, 0])
        warn_tokens_once(info, f"per image is more than row {row} of this forward has ({int(n_visual[row])} visual "
                               f"tokens for {int(images[row])} image(s)): {info.method!r} keeps all of them")


class PruningDecoder:
    """Mixin for a Llama-family decoder model (`LlamaModel`, ...): the one decoder loop of the
    features and llm sites, running any `LlmReducer` between its layers (`select` after each of
    its `sites`) or a vision method on the image features before the first.

    Falls back to the original forward where nothing is pruned: no image tokens in this forward
    and none pruned earlier in its cache."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        scope = INPUTS.get()
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        stored = getattr(cache, CACHED_SLOTS_ATTR, None) if cache is not None else None
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
        rope_ids, position_ids = rope_positions(decoder_adapter(self), position_ids)
        position_ids = position_ids.expand(batch, n)
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
            setattr(cache, CACHED_SLOTS_ATTR, [torch.cat([p, v], dim=1) for p, v in zip(prior, segments_valid)])
        out = scatter_back(h, seg, n)
        if output_hidden_states:
            return BaseModelOutputWithPast(last_hidden_state=out, cache=cache, hidden_states=(*states[:-1], out))
        return BaseModelOutputWithPast(last_hidden_state=out, cache=cache)
