"""The KV-cache engine: a decoder whose cache a policy prunes while it decodes.

What every policy shares lives here; a policy (`KvPolicy`, one file each: `a2sf.py`) says only
how it scores and ranks the cached tokens. The scores come from the attention the model already
runs: its attention modules read tome_plus's routed backend (`llm.attention.routed_attention`),
which, while a policy is active (`llm.context.KV_STEP`), forms the float32 probabilities of the new
queries a block at a time beside the model's own (fused) attention: one q K^T row per decode step,
O(N) memory per head in the prefill. A policy's score of a cached token is the sum over the scored
queries of its weight (`query_weights`) times the probability the query gives the token, summed
over the query heads of each KV head, plus the old score times `fade`.

Pruning keeps, per layer, instance and KV head, the `recent` newest tokens and the best ranked
others (`rank`), once after the prefill or also every `every` decode steps, down to `budget`. A
pruned layer keeps which of its slots are real (`PrunedLayer.valid`); its layers then attend with
masks built here, each head over its own tokens. The cache is HF's `DynamicCache` with these
layers: `generate` with sampling, beam search (reordered with the cache), left-padded batches and
`num_return_sequences` works as unpatched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Union

import torch
import torch.nn as nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..backends.base import PatchInfo, get_info, swap_class, tag
from ..llm import attention, context
from ..llm.attention import RoutedAttention
from ..llm import decoders
from ..llm.decoder import PruningDecoder
from ..llm.slots import keep_hooks

RECENT = 16  # the newest tokens kept by default (A2SF's authors' window), where the budget holds them


@dataclass
class KvPolicy:
    """What every KV-cache policy is given (`patch(..., kv=NAME, kv_options={...})`) and the
    hooks by which it scores. A policy subclasses it with its own options and hooks, as a
    dataclass, and names itself in `name`.

    Attributes:
        budget: tokens each layer keeps per KV head: an int, or a fraction (0, 1] of the prompt.
        recent: the newest tokens always kept. None: 16, or the whole budget where that is smaller
            (an int budget's at `patch`, a fraction's at each prompt). One given is kept as given:
            above an int budget it is refused at `patch`, above a fraction's tokens at the prefill
            of that prompt.
        every: None (prune once, after the prefill; decode tokens are appended), or N: also prune
            every N decode steps down to `budget` (at most `budget + N - 1` tokens between prunes;
            1: never more than `budget`).
    """

    budget: Union[int, float] = 256
    recent: Optional[int] = None
    every: Optional[int] = None

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 or (isinstance(b, float) and b > 1):
            raise ValueError(f"budget must be a token count >= 1 or a fraction of the prompt in (0, 1], got {b!r}")
        if self.recent is not None and (isinstance(self.recent, bool) or not isinstance(self.recent, int)
                                        or self.recent < 0):
            raise ValueError(f"recent must be None or an int >= 0, got {self.recent!r}")
        if isinstance(b, int) and self.recent is not None and self.recent > b:
            raise ValueError(f"recent={self.recent} is more than the budget {b}")
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):
            raise ValueError(f"every must be None or an int >= 1, got {self.every!r}")

    # -- the policy's hooks: how it scores and ranks (defaults: H2O's plain accumulation)

    @property
    def reads_attention(self) -> bool:
        """Whether the policy scores tokens by the attention they receive (else `rank` alone)."""
        return True

    def query_weights(self, n: int, device: torch.device) -> torch.Tensor:
        """`[n]` float32: the weight of each of a forward's `n` queries (oldest first) in the score."""
        return torch.ones(n, device=device)

    def first_scored(self, n: int) -> int:
        """The first of a forward's `n` queries whose weight may be non-zero (host-side, from `n`
        alone): the probabilities of the queries before it are not formed."""
        return 0

    def fade(self, n: int) -> float:
        """The factor on the old scores after a forward of `n` queries."""
        return 1.0

    def rank(self, score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`[B, KV, L]` the order in which a layer's tokens are kept, highest first (padding slots
        are ranked last whatever this says)."""
        return score

    # -- budgets

    def tokens(self, prompt: int) -> int:
        """The budget in tokens for a prompt of `prompt` slots; a `recent` given above a fraction's
        tokens is refused (growing the budget to it, or cutting it, would be a different policy)."""
        if not isinstance(self.budget, float):
            return self.budget
        tokens = max(math.ceil(self.budget * prompt), 1)
        if self.recent is not None and self.recent > tokens:
            raise ValueError(f"kv_options recent={self.recent} is more than budget={self.budget} of this "
                             f"{prompt}-token prompt ({tokens} tokens): lower recent (or leave it out: it then "
                             f"shrinks to the budget) or raise the budget")
        return tokens

    def recent_for(self, budget: int) -> int:
        """The newest tokens kept under a budget of `budget` tokens: `recent`, or by default 16
        where the budget holds them, else the whole budget."""
        return min(RECENT, budget) if self.recent is None else self.recent


class PrunedLayer(DynamicLayer):
    """A cache layer after pruning: per instance and KV head its own tokens (`keys`, `values`
    `[B, KV, L, D]`), which of them are real (`valid`, `[B, KV, L]`: a short row keeps padding
    slots) and their scores (`score`, float32)."""

    valid: torch.Tensor
    score: torch.Tensor
    all_valid: bool = False  # every slot real (host-side, so a decode step needs no mask)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))
        self.score = self.score.index_select(0, beam_idx.to(self.score.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.valid = self.valid.repeat_interleave(repeats, dim=0)
        self.score = self.score.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.valid, self.score = self.valid[indices], self.score[indices]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        length = self.keys.shape[-2]
        self.valid, self.score = self.valid[..., :length], self.score[..., :length]


def prune_layer(layer: DynamicLayer, valid: torch.Tensor, score: torch.Tensor, keep: int, recent: int) -> None:
    """Keep, per instance and KV head, the `recent` newest slots and the `keep - recent` best
    scored others (real slots first), in slot order; the layer becomes an `PrunedLayer`."""
    length = valid.shape[-1]
    rank = score.masked_fill(~valid, float("-inf"))
    if recent:
        rank[..., max(length - recent, 0):] = float("inf")
    index = rank.topk(min(keep, length), dim=-1).indices.sort(dim=-1).values  # [B, KV, keep]
    rows = index.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
    layer.keys, layer.values = layer.keys.gather(2, rows), layer.values.gather(2, rows)
    layer.__class__ = keep_hooks(layer, PrunedLayer)
    layer.valid, layer.score = valid.gather(2, index), score.gather(2, index)
    layer.all_valid = bool(layer.valid.all())


def block_mask(keys: torch.Tensor, start: int, rows: int, n: Optional[int] = None) -> torch.Tensor:
    """`[B, H, rows, L]` which keys the new queries `start .. start + rows` (of `n`, the last slots)
    see: the real ones (`keys`, `[B, H, L]`), causal by slot; a query always sees itself (a
    padding row with no key would give NaN in SDPA)."""
    n = rows if n is None else n
    length = keys.shape[-1]
    slot = length - n + start + torch.arange(rows, device=keys.device)  # each query's own slot
    causal = torch.arange(length, device=keys.device) <= slot[:, None]
    own = keys.unsqueeze(2) & causal
    own[..., torch.arange(rows, device=keys.device), slot] = True
    return own


@dataclass(eq=False)
class KvStep:
    """One forward of a decoder under a cache policy (`llm.context.KV_STEP`): what its attention needs
    to score the new queries and to mask pruned layers, and the scores it leaves."""

    config: "KvPolicy"
    cache: DynamicCache
    past_valid: torch.Tensor  # [B, P] the real slots of layers not yet pruned (the caller's mask)
    new_valid: torch.Tensor  # [B, N] the real new tokens
    scoring: bool  # whether this forward's queries are scored
    scores: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, KV, P + N] float32
    new_all: bool = False  # every new token real (host-side; set once per forward)
    # a decoder that prunes between its layers (ATP, FastV, the features site) tells each layer's
    # own slots: layer -> ([B, P] its cached slots' validity, [B, N'] its new slots')
    segments: Dict[int, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.new_all = bool(self.new_valid.all())

    def new_of(self, layer_idx: int, device: torch.device) -> torch.Tensor:
        """`[B, N]` the real new slots of layer `layer_idx`, on `device` (a model split over devices
        has its layers on several)."""
        return (self.segments[layer_idx][1] if layer_idx in self.segments else self.new_valid).to(device)

    def keys_valid(self, layer_idx: int, kv_heads: int, device: torch.device) -> torch.Tensor:
        """`[B, KV, P + N]` the real keys of layer `layer_idx` in this forward, on `device`."""
        layer = self.cache.layers[layer_idx]
        past, fresh = self.segments.get(layer_idx, (self.past_valid, self.new_valid))
        past, fresh = past.to(device), fresh.to(device)
        batch, n = fresh.shape
        if isinstance(layer, PrunedLayer):
            return torch.cat([layer.valid, fresh.unsqueeze(1).expand(batch, kv_heads, n)], dim=-1)
        return torch.cat([past, fresh], dim=-1).unsqueeze(1).expand(batch, kv_heads, -1)

    def attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask, scaling: float):
        """Score this forward's queries (when asked) and return the mask the layer attends with:
        the model's own, or, for a pruned layer, one built from its slots (`[B, H, N, P + N]`)."""
        layer_idx = module.layer_idx
        layer = self.cache.layers[layer_idx]
        heads, kv_heads, n = query.shape[1], key.shape[1], query.shape[2]
        pruned = isinstance(layer, PrunedLayer)
        if not (self.scoring or pruned):
            return mask
        if not self.scoring and n == 1 and layer.all_valid and self.new_all and layer_idx not in self.segments:
            return None  # one query over real keys only: no mask, the backend's fastest path
        valid = self.keys_valid(layer_idx, kv_heads, key.device)  # [B, KV, L]
        if self.scoring:
            self.scores[layer_idx] = self._accumulate(layer_idx, layer, query, key, valid, scaling, kv_heads)
        if not pruned:
            return mask
        own = block_mask(valid.repeat_interleave(heads // kv_heads, dim=1), 0, n)  # [B, H, N, L]
        if module.__dict__["config"]._attn_implementation == "eager":
            return torch.zeros(own.shape, dtype=query.dtype, device=own.device).masked_fill(
                ~own, torch.finfo(query.dtype).min)
        return own

    def _accumulate(self, layer_idx, layer, query, key, keys, scaling, kv_heads) -> torch.Tensor:
        """The scores after this forward's queries: the old ones times the policy's `fade(N)`, plus
        sum_q w_q S[q] over the real queries (`query_weights`), S the probabilities summed over the
        query heads of each KV head; the probabilities and their mask (`keys`: `[B, KV, L]` the real
        slots) a block of queries at a time (`llm.attention.BLOCK` logits), so memory stays O(L)
        per head however long the prompt."""
        batch, heads, n, _ = query.shape
        length = key.shape[2]
        weights = self.config.query_weights(n, query.device) * self.new_of(layer_idx, query.device).float()  # [B, N]
        total = query.new_zeros(batch, kv_heads, length, dtype=torch.float32)
        step = max(1, attention.BLOCK // (batch * heads * length))
        for start in range(self.config.first_scored(n), n, step):
            q = query[:, :, start:start + step]
            rows = q.shape[2]
            # causal by slot: the block's queries see no key past its last query's slot, so the
            # keys stop there (E slots) instead of forming columns masked to zero probability
            end = length - n + start + rows
            logits = attention.grouped_logits(q, key[:, :, :end], scaling)  # [B, KV, G, rows, E]
            own = block_mask(keys[..., :end], start, rows, start + rows).unsqueeze(2)  # [B, KV, 1, rows, E]
            probs = logits.masked_fill_(~own, float("-inf")).softmax(dim=-1)  # in place: logits are this block's own
            # [1, rows] x [rows, E] per head: sums over the queries without permuting the probabilities
            w = weights[:, start:start + step].view(batch, 1, 1, 1, rows)
            total[..., :end] += (w @ probs).sum(dim=(2, 3))
        old = layer.score if isinstance(layer, PrunedLayer) else None
        if old is not None:
            total[..., :old.shape[-1]] += old * self.config.fade(n)
        return total

    def finish(self, prefill: bool, forwards_since: int) -> bool:
        """After the forward: extend tracked layers by the new tokens, and prune where due.
        Returns whether it pruned."""
        config = self.config
        length = self.cache.get_seq_length()
        if prefill:  # what a fractional budget is a fraction of
            setattr(self.cache, PROMPT_ATTR, length)
        budget = config.tokens(getattr(self.cache, PROMPT_ATTR, None) or length)
        if config.every is None:
            due = prefill and length > budget
        else:
            due = length > budget and (prefill or forwards_since + 1 >= config.every)
        # in `every` mode the scores follow every step: they live on the layers (reordered with beams)
        track = config.every is not None and config.reads_attention
        for i, layer in enumerate(self.cache.layers):
            if not getattr(layer, "is_initialized", False) or layer.keys is None:
                continue
            kv_heads = layer.keys.shape[1]
            if isinstance(layer, PrunedLayer):
                fresh = self.new_of(i, layer.keys.device)
                layer.valid = torch.cat([layer.valid, fresh.unsqueeze(1).expand(-1, kv_heads, fresh.shape[1])], dim=-1)
                layer.all_valid = layer.all_valid and self.new_all and i not in self.segments
                score = self.scores.get(i)
                layer.score = score if score is not None else torch.cat(
                    [layer.score, layer.score.new_zeros(layer.score.shape[0], kv_heads, fresh.shape[1])], dim=-1)
            elif due or track:
                valid = self.keys_valid(i, kv_heads, layer.keys.device)
                score = self.scores.get(i)
                layer.__class__ = keep_hooks(layer, PrunedLayer)
                layer.valid = valid.contiguous()
                layer.score = score if score is not None else torch.zeros(valid.shape, device=valid.device)
                layer.all_valid = bool(valid.all())
            if due:
                prune_layer(layer, layer.valid, config.rank(layer.score, layer.valid), budget,
                            config.recent_for(budget))
        return due


PROMPT_ATTR = "_tome_plus_kv_prompt"  # on a cache: the prompt length its fractional budget refers to
STEPS_ATTR = "_tome_plus_kv_steps"  # on a cache: forwards since it was last pruned


class KvDecoder:
    """Mixin for a Llama-family decoder model: its cache follows the patch's KV policy."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        config = get_info(self).kv
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"the {config.name} KV policy keeps a different set of tokens per head in each "
                             f"layer, which a {type(cache).__name__} cannot hold; use the default dynamic cache")
        if not use_cache:  # no cache to prune: running on would quietly be the unpatched model
            raise ValueError(f"kv={config.name!r} prunes the KV cache, but this call has use_cache=False (or the "
                             f"model's config says so): call with use_cache=True, or patch without kv= for "
                             f"cacheless forwards")
        if cache is None:
            cache = DynamicCache(config=self.config)
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
            raise ValueError("with a KV policy the language model takes the [batch, length] padding mask")
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, n = tokens.shape[:2]
        past = cache.get_seq_length()
        pruned = any(isinstance(layer, PrunedLayer) for layer in cache.layers)
        full = attention_mask.bool() if attention_mask is not None else None
        if pruned:
            if full is None and position_ids is None:
                raise ValueError("after the KV cache was pruned, a forward needs the attention_mask of the whole "
                                 "conversation (or position_ids) to place its tokens")
            if position_ids is None:
                position_ids = (full.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
            # HF builds its masks for what the cache holds; the pruned layers take theirs from the step
            attention_mask = torch.ones(batch, past + n, dtype=torch.long, device=tokens.device)
        if full is None:
            full = torch.ones(batch, past + n, dtype=torch.bool, device=tokens.device)
        prefill = past == 0
        # (a decoder that prunes between its layers holds fewer slots than the conversation: it says which)
        if not pruned and full.shape[1] != past + n and not isinstance(self, PruningDecoder):
            raise ValueError(f"attention_mask covers {full.shape[1]} tokens, but the cache holds {past} and {n} are new")
        step = KvStep(config, cache, past_valid=full[:, :past] if not pruned else full[:, :0],
                      new_valid=full[:, -n:], scoring=config.reads_attention and (prefill or config.every is not None))
        token = context.KV_STEP.set(step)
        try:
            with context.ROUTING.on():
                out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, inputs_embeds=inputs_embeds, use_cache=True, **kwargs)
        finally:
            context.KV_STEP.reset(token)
        since = getattr(cache, STEPS_ATTR, 0)
        setattr(cache, STEPS_ATTR, 0 if step.finish(prefill, since) else since + 1)
        return out


def cache_lengths(cache: DynamicCache) -> List[int]:
    """Tokens each layer of `cache` holds per head."""
    return [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]


def check_decoder(decoder: nn.Module, name: str) -> None:
    """Refuse (by name) a language model whose cache this policy cannot prune."""
    decoders.check_decoder(decoder, f"kv={name!r}", kind="kv")
    backend = decoder.config._attn_implementation
    if backend not in ("eager", "sdpa"):
        raise ValueError(f"kv={name!r} masks each KV head over its own tokens, which the {backend} backend does not "
                         f"take; load the model with attn_implementation='sdpa' or 'eager'")


def install(decoder: nn.Module, info: PatchInfo) -> None:
    """The decoder keeps its cache by `info.kv`; its attention reads the routed backend."""
    swap_class(decoder, KvDecoder, info)
    tag(decoder, info)
    for layer in decoder.layers:
        if not isinstance(layer.self_attn, RoutedAttention):  # ATP/FastV/features routed them already
            swap_class(layer.self_attn, RoutedAttention, info)
