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
layer after its site on; the last is the normed output, as HF ties it; a list of layers selects
them as HF does), and so does `output_attentions` with a backend that returns probabilities:
each layer's map at the input's positions (`attention_at_inputs`; a pruned or padding token's
row and column zeros).

The KV cache of a layer after a module holds that segment's tokens only. Which of its slots are
real is kept in a book on the cache object itself (`slots.SlotBook`; it travels with `generate`
and is reordered with beam search), so decoding steps and later turns attend to exactly what
each layer kept. A static cache holds them in its fixed buffer, masked (`slots.segment_keys`).
The output hidden states are scattered back to the input's positions (zeros where a token was
pruned), so logits and labels line up as unpatched. Packed prompts (restarting position ids, no
mask, no cache) are unpacked into a padded batch first (`packed`), so each is pruned alone.

In training the modules' soft masks enter every later layer's attention as `log(m)` on the keys
(the tokens stay; shapes are static), and the layer-averaged kept fraction is left for the
budget loss.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Set

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, flash_attention_mask, flex_attention_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..backends.base import PatchInfo, get_info
from ..methods.base import LlmSite, Recycled
from .attention import BACKEND, RECORD, SCORE, ScoreRequest
from .context import INPUTS, KV_STEP, ROUTING
from .decoders import decoder_adapter, explicit_masks, layer_types, rope_positions
from .features import query_attention, reduce_features, warn_tokens_once
from .packed import packing, repack, sequence_ids, unpack, unpack_inputs
from .segments import Segment, compact, instruction_after_image, layer_mask, mask_builder, scatter_back, segment_mask
from .slots import (SegmentKeys, book_of, check_cache, conversation_keys, hook_book, is_static, keep_every_slot,
                    open_book, segment_keys)

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


def numbered(valid: torch.Tensor, first: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`[B, K]` positions `first, first + 1, ...` (`first`: `[B]`) on each row's real slots in
    order; the other slots keep `positions`."""
    rank = valid.long().cumsum(dim=1) - 1
    return torch.where(valid, first[:, None] + rank, positions)


def recycled_order(rec: Recycled, visual: torch.Tensor) -> torch.Tensor:
    """The sort key that puts a row's merged tokens after its last kept visual token (in their
    `rank` order; before its first visual token where none is kept), every other slot in order."""
    n = visual.shape[1]
    slot = torch.arange(n, device=visual.device).expand_as(visual)
    kept_visual = rec.keep & visual & ~rec.merged
    first_visual = torch.where(visual, slot, torch.full_like(slot, n)).min(dim=1).values - 1
    anchor = torch.where(kept_visual.any(dim=1), torch.where(kept_visual, slot, -1).max(dim=1).values, first_visual)
    return torch.where(rec.merged, (anchor[:, None] + 1) * (n + 1) + 1 + rec.rank, (slot + 1) * (n + 1))


def deepstack(h: torch.Tensor, visual: Optional[torch.Tensor], features) -> Optional[torch.Tensor]:
    """Qwen3-VL's DeepStack features (`features`: one `[visual tokens, D]` per level, in the order of
    `visual`'s True slots, batch-major) as `[B, N, levels, D]` at the input's positions (zeros
    elsewhere): a site keeps or merges them with their token, and the level-`i` features are added
    to the visual tokens' hidden states after layer `i`, as HF's `_deepstack_process` does."""
    if not features:
        return None
    deep = h.new_zeros(h.shape[0], h.shape[1], len(features), h.shape[-1])
    deep[visual] = torch.stack(list(features), dim=1).to(h.dtype)
    return deep


def hidden_selection(selection, layers: int) -> Optional[Set[int]]:
    """Which of the `layers + 1` hidden states `output_hidden_states` asks for (True, False/None, an
    index or a list of them, negative ones counted from the end, as HF's `capture_outputs`)."""
    if selection is None or selection is False:
        return None
    total = layers + 1
    if selection is True:
        return set(range(total))
    chosen = [selection] if isinstance(selection, int) else list(selection)
    return {i % total for i in chosen if -total <= i < total}


def attention_at_inputs(probs: torch.Tensor, seg: Segment, keys: SegmentKeys, n: int, width: int) -> torch.Tensor:
    """A layer's probabilities `[B, H, K, Lk]` at the input's positions `[B, H, n, width]`: rows at
    the tokens' input positions, columns at their keys' conversation columns; a pruned or padding
    token's row and column are zeros."""
    batch, heads, k, length = probs.shape
    probs = probs * seg.valid[:, None, :, None].to(probs.dtype)
    column = torch.where(keys.column >= 0, keys.column, torch.full_like(keys.column, width))
    by_column = probs.new_zeros(batch, heads, k, width + 1).scatter(
        3, column[:, None, None, :].expand(batch, heads, k, length), probs)[..., :width]
    return probs.new_zeros(batch, heads, n, width).scatter(
        2, seg.index[:, None, :, None].expand(batch, heads, k, width), by_column)


@dataclass
class Outputs:
    """What a forward returns besides the last hidden state: the hidden states asked for (by index,
    None: none) and whether the attention probabilities are (`output_attentions`)."""

    hidden: Optional[Set[int]]
    attentions: bool


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
        book = book_of(cache)
        if (scope is None or not scope.has_visual) and book is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if isinstance(attention_mask, dict):
            if scope is None:
                raise ValueError("the language model got prepared attention masks (a dict); tome_plus prunes with the "
                                 "[batch, length] padding mask: pass that")
            # Gemma 3's VLM prepares its layers' masks; the loop builds its own from the call's padding mask
            attention_mask = scope.attention_mask
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"the language model got a {attention_mask.dim()}-D attention mask; tome_plus prunes with "
                             f"the [batch, length] padding mask (each row keeps its own tokens): pass that")
        outputs = Outputs(hidden_selection(kwargs.get("output_hidden_states", self.config.output_hidden_states),
                                           len(self.layers)),
                          bool(kwargs.get("output_attentions", self.config.output_attentions)))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache, cache = False, None  # as HF's checkpointed layers do (a cache would not be replayed)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        h = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        deep = deepstack(h, kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None))
        if deep is not None and not decoder_adapter(self).deepstack:
            raise ValueError(f"{type(self).__name__} was given DeepStack features, which its decoder row "
                             f"({decoder_adapter(self).model_type!r}) does not say it adds (`deepstack=True`)")
        with ROUTING.on():
            if cache is None and attention_mask is None and position_ids is not None:
                # no mask and no cache: HF reads restarting position ids as packed prompts
                text = rope_positions(decoder_adapter(self), position_ids)[1]
                ids = sequence_ids(text.expand(h.shape[0], -1)) if text.dim() == 2 else None
                if ids is not None:
                    return self._packed_forward(scope, h, position_ids, ids, outputs, deep)
            return self._pruning_forward(scope, book, attention_mask, position_ids, cache, h, outputs, deep)

    def _packed_forward(self, scope, h, position_ids, ids, outputs, deep=None):
        """Packed prompts run as a left-padded batch of one prompt per row (`llm.packed`), their
        outputs put back at the packed positions."""
        p = packing(ids)
        batch = h.shape[0]
        rows = (lambda t: unpack(t.expand(batch, -1), p)) if position_ids.dim() == 2 else (
            lambda t: unpack(t.expand(-1, batch, -1), p, dim=1))
        inner = unpack_inputs(scope, p)
        out = self._pruning_forward(inner, None, p.real.long(), rows(position_ids), None, unpack(h, p), outputs,
                                    unpack(deep, p) if deep is not None else None)
        if scope is not None and inner is not scope:
            scope.kept, scope.positions, scope.kept_fraction = inner.kept, inner.positions, inner.kept_fraction
        states = None
        if out.hidden_states is not None:
            states = tuple(s if s is None else repack(s, p) for s in out.hidden_states)
        attentions = None
        if out.attentions is not None:
            attentions = tuple(repack_attention(a, p) for a in out.attentions)
        return BaseModelOutputWithPast(last_hidden_state=repack(out.last_hidden_state, p), hidden_states=states,
                                       attentions=attentions)

    def _pack_positions(self, h, seg: Segment) -> Segment:
        """`positions="packed"`: the kept tokens numbered consecutively from the row's first real
        one (1-D rotary), their angles made for those positions."""
        first = torch.where(seg.valid, seg.positions, torch.full_like(seg.positions, 1 << 30)).min(dim=1).values
        return self._angles(h, replace(seg, positions=numbered(seg.valid, first, seg.positions)))

    def _pack_site(self, before: Segment, after: Segment, book, segment: int) -> Segment:
        """`positions="packed"` at a pruning site (PyramidDrop's and SparseVLM's code): the tokens
        left (`after`, compacted from `before`) are numbered consecutively from the forward's
        first token, itself moved back by what this site removed in earlier forwards (the book's
        `site_shift`, which this forward's removals join: later tokens move back by them)."""
        earlier = book.site_shift.get(segment + 1) if book is not None else None
        base = before.positions - (earlier[:, None] if earlier is not None else 0)
        big = torch.full_like(base, 1 << 30)
        first = torch.where(before.valid, base, big).min(dim=1).values
        last = torch.where(before.valid, base, -big).max(dim=1).values
        if book is not None:
            shift = last - (first + after.valid.sum(dim=1) - 1)
            book.site_shift[segment + 1] = shift if earlier is None else earlier + shift
        return replace(after, positions=numbered(after.valid, first, after.positions))

    def _angles(self, h, seg: Segment) -> Segment:
        """The rotary angles of the segment's (renumbered) positions."""
        cos, sin = self._rotary(h, seg.positions)
        return replace(seg, cos=cos, sin=sin)

    def _rotary(self, h, positions):
        """`(cos, sin)` of `positions`: the rotary embedding's, or, for a decoder with angles per
        layer type (Gemma 3), each type's side by side on the last axis (`_angle_picker` picks)."""
        if not decoder_adapter(self).layer_rotary:
            return self.rotary_emb(h, position_ids=positions)
        parts = [self.rotary_emb(h, positions, kind) for kind in sorted(set(layer_types(self)))]
        return torch.cat([c for c, _ in parts], dim=-1), torch.cat([s for _, s in parts], dim=-1)

    def _angle_picker(self):
        """`pick(seg, layer)`: the `(cos, sin)` layer `layer` takes from the segment's angles
        (`_rotary`'s: one set for every layer, or one per layer type side by side); the row is read
        once per forward, not per layer."""
        if not decoder_adapter(self).layer_rotary:
            return lambda seg, layer: (seg.cos, seg.sin)
        types = layer_types(self)
        kinds = sorted(set(types))
        at = [kinds.index(kind) for kind in types]

        def pick(seg: Segment, layer: int):
            width = seg.cos.shape[-1] // len(kinds)
            part = slice(at[layer] * width, (at[layer] + 1) * width)
            return seg.cos[..., part], seg.sin[..., part]
        return pick

    def _pruning_forward(self, scope, book, attention_mask, position_ids, cache, h, outputs: Outputs, deep=None):
        info = get_info(self)
        # an LLM method prunes after the layers it names (`LlmReducer.sites`); a vision method
        # reduces the image features once, before the first layer
        reducer = info.reducer
        features = info.parts.site == "features"
        sites = () if features else reducer.sites(len(self.layers))
        row, types, angles = decoder_adapter(self), layer_types(self), self._angle_picker()
        # Gemma 3's sliding layers: a window on the look-back in their masks, every slot in their cache
        windows = {"sliding_attention": self.config.sliding_window} if row.sliding_window == "masked" else {}
        if windows:
            keep_every_slot(cache)
        check_cache(cache, lambda what: ValueError(
            f"{method_at(info.method, info.parts.site)} keeps a different number of tokens per instance in each "
            f"layer's cache, which {what} cannot hold; use the default dynamic cache or cache_implementation='static'"))
        static = is_static(cache)
        book = open_book(cache) if cache is not None else None
        batch, n, _ = h.shape
        if static:  # the conversation so far, without reading the buffer's fill level (no host sync)
            past = attention_mask.shape[1] - n if attention_mask is not None else int(cache.get_seq_length())
        elif attention_mask is None and book is not None and book.length is not None:
            past = book.length  # the conversation so far, not the cache's slots (fewer where a site pruned)
        else:  # read from a layer with keys (Qwen3.5's first is a linear one: a count tensor, a host sync)
            first_kv = types.index("full_attention") if row.linear_attention else 0
            past = cache.get_seq_length(first_kv) if cache is not None else 0
        if position_ids is None:
            # after the features site every layer's cache holds the reduced prompt: the mask
            # counts the conversation
            offset = past
            if features and book is not None and book.valid:
                if attention_mask is None and book.length is None:
                    raise ValueError("with image features reduced in the cache, a forward needs the attention_mask "
                                     "of the whole conversation (or position_ids) to place its tokens")
                offset = attention_mask.shape[1] - n if attention_mask is not None else book.length
            position_ids = (torch.arange(n, device=h.device) + offset).unsqueeze(0)
        rope_ids, position_ids = rope_positions(row, position_ids)
        position_ids = position_ids.expand(batch, n)
        packed = features and info.config.positions == "packed"
        # positions="packed" at site="llm": each site renumbers what follows it (`_pack_site`)
        packs_sites = not features and info.config.positions == "packed"
        if packed and book is not None and book.shift is not None:
            # HF counts the conversation's tokens; the kept ones were numbered without the reduced
            position_ids = rope_ids = position_ids - book.shift[:, None]
        # before the first pruning site the layers take HF's mask; after it, one built here in the
        # form their backend takes (`layer_mask`)
        backend = self.config._attn_implementation
        if mask_builder(backend) is flex_attention_mask and h.device.type == "cpu":
            # torch's CPU flex kernel fails to compile for a mask that reads a tensor (a padded batch,
            # unpatched too): on a CPU these layers run SDPA over the same mask
            backend = "sdpa"
        if static and mask_builder(backend) in (flex_attention_mask, flash_attention_mask):
            raise ValueError(f"{method_at(info.method, info.parts.site)} with a static cache masks each row's slots "
                             f"in the fixed buffer, which the {backend} backend's mask does not describe; load the "
                             f"model with attn_implementation='sdpa' or 'eager', or use the default dynamic cache")
        # else every layer takes a mask built here
        hf_masks = backend == self.config._attn_implementation and not features and not explicit_masks(row)
        hf_mask = None
        if hf_masks:
            hf_mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                                         cache=cache, position_ids=position_ids if rope_ids.dim() == 2 else None)
        cos, sin = self._rotary(h, rope_ids)
        full = attention_mask.bool() if attention_mask is not None else torch.ones(batch, past + n, dtype=torch.bool,
                                                                                  device=h.device)
        if book is not None:
            book.length = full.shape[1]
        valid = full[:, -n:]
        prior = full[:, :full.shape[1] - n]  # the conversation before this forward
        visual = scope.visual if scope is not None and scope.has_visual else torch.zeros_like(valid)
        spatial = scope.spatial if scope is not None and scope.has_visual else torch.zeros(batch, n, device=h.device)
        seg = Segment(index=torch.arange(n, device=h.device).expand(batch, n), valid=valid, positions=position_ids,
                      cos=cos.expand(batch, -1, -1), sin=sin.expand(batch, -1, -1), visual=visual & valid,
                      spatial=spatial, instruction=instruction_after_image(visual, valid), prompt=valid,
                      groups=torch.where(valid, scope.groups, -1) if scope is not None and scope.groups is not None
                      else None)
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
        # output_hidden_states: the embeddings and each layer's output, at the input's positions
        selected = outputs.hidden or set()
        states = [scatter_back(h, seg, n) if 0 in selected else None]
        probs: Dict[int, torch.Tensor] = {}
        attentions = []
        keys = conversation_keys(cache, full, n)
        width = keys.valid.shape[1]  # output_attentions' columns: what an unpatched layer attends over
        segment = -1  # the book's segment of the current layers (-1: the conversation, before any site)
        if features:  # a site before the first layer: every layer takes a mask built here
            if scope is not None and scope.has_visual:
                h, keep, carried = reduce_features(self, h, seg, scope, info, angles(seg, 0),
                                                   carry=deep.flatten(2) if deep is not None else None)
                deep = carried.view_as(deep) if deep is not None else None
                real = seg.valid.sum(dim=1)
                h, seg = compact(h, seg, keep)
                if packed:
                    seg = self._pack_positions(h, seg)
                    if book is not None:
                        removed = real - seg.valid.sum(dim=1)
                        book.shift = removed if book.shift is None else book.shift + removed
                scope.kept.append(seg.visual.sum(dim=1))
                scope.positions.append(torch.where(seg.valid, seg.positions, torch.full_like(seg.positions, -1)))
            segment = 0
            keys = segment_keys(cache, book, 0, 0, seg.valid, seg.index, prior)
        # what the method keeps for this forward from its input (SparseVLM's raters)
        memo = reducer.forward_memo(h, seg.visual, seg.instruction, seg.valid) if (
            sites and scope is not None and scope.has_visual) else None
        def masks_of(keys: SegmentKeys, seg: Segment) -> dict:
            """The segment's mask per layer type (one where the layers are of one type); a
            linear-attention layer takes the `[B, K]` padding mask (its padding slots' input zeroed:
            the left padding leaves its state as a row alone's)."""
            return {kind: seg.valid if kind == "linear_attention" else
                    layer_mask(keys, seg, h.dtype, backend, windows.get(kind)) for kind in set(types or [None])}

        # a mask changes only at a pruning site: built once per segment (a flex BlockMask is costly)
        masks = masks_of(keys, seg)
        if hf_masks and segment < 0:
            masks = {kind: seg.valid if kind == "linear_attention" else hf_mask for kind in masks}
        for i, layer in enumerate(self.layers):
            site = i in sites
            kind = types[i] if types else None
            explicit = site and scope is not None and scope.has_visual
            if explicit and past and getattr(cache.layers[i], "valid", None) is not None:
                # a KV policy pruned this layer's cache per head: the scoring mask, built per slot, no longer fits
                raise ValueError(f"{info.method} scores new visual tokens against a KV cache that kv={info.kv.name!r} "
                                 f"pruned; put each image in the prompt of its own generate call (a later turn's "
                                 f"images are not supported with a KV policy at site='llm')")
            extra = {BACKEND: backend}
            if outputs.attentions:
                extra[RECORD] = probs
            if explicit:
                memo_now = memo.gather(1, seg.index) if memo is not None else None
                # `memo` only for a method that keeps one: a method written to the four-mask signature still runs
                weights = reducer.query_weights(seg.visual, seg.instruction, seg.valid, seg.prompt,
                                                **({"memo": memo_now} if memo_now is not None else {}))
                request = ScoreRequest(weights, segment_mask(keys, seg, h.dtype, windows.get(kind)), keys.first,
                                       query=weights.argmax(dim=-1) if reducer.one_query else None,
                                       causal=seg.groups is None)
                if not reducer.scores_next_layer:
                    extra[SCORE] = request
            kv = KV_STEP.get()
            if kv is not None:  # a KV policy reads this layer's own slots (a dynamic cache's: `first` is an int)
                kv.segments[i] = (keys.valid[:, :keys.first], keys.valid[:, keys.first:])
            h = layer(h, attention_mask=masks[kind], position_ids=seg.positions, cache=cache,
                      use_cache=cache is not None, position_embeddings=angles(seg, i), **extra)
            h = h[0] if isinstance(h, tuple) else h
            if i + 1 in selected:
                states.append(scatter_back(h, seg, n))
            else:
                states.append(None)
            if deep is not None and i < deep.shape[2]:  # after the layer's output, as HF's DeepStack
                h = h + deep[:, :, i].gather(1, seg.index[..., None].expand_as(h)) * seg.visual[..., None].to(h.dtype)
            if i in probs:
                attentions.append(attention_at_inputs(probs.pop(i), seg, keys, n, width))
            kept_sum = kept_sum + fraction_now
            if not site or i + 1 == len(self.layers):
                continue
            if explicit:
                # in training, tokens the hard rule pruned earlier are no longer ranked, as at inference
                candidates = alive if soft else seg.visual
                if reducer.config.tokens is not None and reducer.tokens_counted:
                    check_tokens_per_row(info, candidates.sum(dim=1), scope.images)
                got = request.received
                if reducer.scores_next_layer:  # the next layer's q and k, for the one query (this forward's keys)
                    query = request.query[:, 0]
                    seen = seg.valid & (torch.arange(h.shape[1], device=h.device) <= query[:, None])
                    got = query_attention(self.layers[i + 1], h, *angles(seg, i + 1), query,
                                          seen).unsqueeze(1)
                keep = reducer.select(LlmSite(
                    layer=i, hidden=h, received=got, visual=seg.visual, candidates=candidates,
                    instruction=seg.instruction, valid=seg.valid, prompt=seg.prompt, spatial=seg.spatial,
                    images=scope.images, n_visual=n_visual.long(), index=seg.index, memo=memo_now,
                    trainable=info.modules, soft=soft))
                if soft and isinstance(keep, Recycled):
                    raise ValueError(f"{info.method} merges pruned tokens back, which soft masks cannot train")
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
                    key = None
                    if isinstance(keep, Recycled):
                        h, key, keep = keep.hidden, recycled_order(keep, seg.visual), keep.keep
                    before = seg
                    h, seg = compact(h, seg, keep, key)
                    if packs_sites:
                        seg = self._angles(h, self._pack_site(before, seg, book, segment))
                    scope.kept.append(seg.visual.sum(dim=1))
                    scope.positions.append(torch.where(seg.valid, seg.positions, torch.full_like(seg.positions, -1)))
            elif packs_sites and book is not None and book.site_shift.get(segment + 1) is not None:
                # a decoding step: the tokens come after what this site removed in earlier forwards
                seg = self._angles(h, replace(seg, positions=seg.positions - book.site_shift[segment + 1][:, None]))
            # the next layers cache this segment's slots: the book says which are real
            segment += 1
            keys = segment_keys(cache, book, segment, i + 1, seg.valid, seg.index, prior)
            masks = masks_of(keys, seg)
        h = self.norm(h)
        if cache is not None:
            hook_book(cache)
        if scope is not None and soft:  # rows without image tokens have no fraction (nan)
            scope.kept_fraction = torch.where(n_visual > 0, kept_sum / len(self.layers), torch.nan)
        out = scatter_back(h, seg, n)
        if states[-1] is not None:  # the last is the normed output, as HF ties it
            states[-1] = out
        return BaseModelOutputWithPast(last_hidden_state=out, cache=cache,
                                       hidden_states=tuple(states) if outputs.hidden is not None else None,
                                       attentions=tuple(attentions) if outputs.attentions else None)


def repack_attention(probs: torch.Tensor, p) -> torch.Tensor:
    """An unpacked batch's probabilities `[S, H, M, M]` at the packed positions `[B, H, L, L]`
    (zeros between prompts, which do not attend to each other)."""
    batch, length = p.shape
    out = probs.new_zeros(batch, probs.shape[1], length, length)
    for s in range(probs.shape[0]):
        real = p.real[s]
        row, column = p.row[s, real][0], p.column[s, real]
        out[row, :, column[:, None], column[None, :]] = probs[s][:, real][:, :, real].permute(1, 2, 0)
    return out
