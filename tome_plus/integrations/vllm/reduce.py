"""One image's (or video's) embeddings, as a vLLM model hands them to its language model,
reduced by the served vision method: the reducible tokens (a family's newline tokens aside,
which mark the grid's rows and stay) merged or pruned to the served count, every token kept in
its input order. The same computation as tome_plus's HF features site (`llm.features`)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ...llm.features import AttentionGraph, reduce_sets
from .settings import Settings, check_count, check_parallel, first_layer, read


def reduced_count(settings: Settings, total: int, newlines: int = 0) -> int:
    """Placeholders for an item of `total` embeddings, `newlines` of them newline tokens."""
    return newlines + check_count(settings, total - newlines)


def first_layer_attention(layer: nn.Module, x: torch.Tensor, places: torch.Tensor) -> AttentionGraph:
    """`[G, H, n, n]` float32 attention (formed as it is read: `AttentionGraph`) among each set's
    tokens (`x`: `[G, n, D]` embeddings at `places` within their image: `[G, n]`, or `[G, n, 3]`
    M-RoPE (t, h, w) positions) in vLLM's first decoder layer (its norm, q/k projection and rotary
    embedding), every token seeing every other: Zero-TPrune's graph, as the HF features site forms
    it (`llm.features.image_attention`; rotary angles depend only on the distance between places,
    per M-RoPE section too, so the image's offset in the prompt does not matter)."""
    attn = layer.self_attn
    sets, n, dim = x.shape
    qkv, _ = attn.qkv_proj(layer.input_layernorm(x.reshape(-1, dim)))
    q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    places = places.reshape(-1) if places.dim() == 2 else places.reshape(-1, 3).T
    q, k = attn.rotary_emb(places, q, k)
    q = q.reshape(sets, n, -1, attn.head_dim).transpose(1, 2)
    k = k.reshape(sets, n, -1, attn.head_dim).transpose(1, 2)
    return AttentionGraph(q, k, attn.scaling)


def reduce_item(x: torch.Tensor, settings: Settings, newline: Optional[torch.Tensor] = None,
                layer: Optional[nn.Module] = None, places: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """`[T, D]` embeddings -> `[reduced_count, D]` and the rows of `x` they stand at (a merged
    token: its destination's row), in input order; `newline`: the family's newline embedding;
    `layer`: the language model's first decoder layer, where the method reads attention, at
    `places` (`[T]` or `[T, 3]` M-RoPE positions; default: 0 .. T-1)."""
    reducible = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if newline is not None:
        reducible = ~(x == newline.to(x.dtype)).all(dim=-1)
    rows = reducible.nonzero()[:, 0]
    n_keep = check_count(settings, len(rows))
    if n_keep >= len(rows):
        return x, torch.arange(x.shape[0], device=x.device)
    attention = None
    if layer is not None:
        at = rows if places is None else places[rows]
        attention = lambda current, index: first_layer_attention(layer, current, at[index])
    kept, index = reduce_sets(x[rows].unsqueeze(0), settings.reducer, n_keep, attention)
    kept_rows = rows[index[0]]
    out = x.clone()
    out[kept_rows] = kept[0].to(x.dtype)
    keep = ~reducible
    keep[kept_rows] = True
    return out[keep], keep.nonzero()[:, 0]


class ServedModel:
    """Mixin for a vLLM model class: reads the `tome_plus` entry at construction (refusing a bad
    one then, at start-up) and finds the decoder layer the method reads attention from. Without
    the entry the model is vLLM's."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tome_plus = read(vllm_config.model_config.hf_config)
        check_parallel(self.tome_plus)
        # not a submodule (its weights are the language model's): kept out of the module tree
        self.__dict__["tome_plus_layer"] = first_layer(self.tome_plus, self.language_model)


class ReducingModel(ServedModel):
    """Mixin for a 1-D rotary family (the LLaVAs): each image's embeddings reduced
    (`_process_image_input`), kept tokens numbered consecutively by vLLM; a family with newline
    tokens sets `NEWLINES`."""

    NEWLINES = False

    def reduce_items(self, items):
        """Each item's `[..., D]` embeddings reduced (flattened to `[T, D]`); unchanged without the entry."""
        if self.tome_plus is None or self.tome_plus.site == "tower":  # the tower reduced them
            return items
        newline = self.image_newline if self.NEWLINES else None
        return [reduce_item(item.reshape(-1, item.shape[-1]), self.tome_plus, newline, layer=self.tome_plus_layer)[0]
                for item in items]

    def _process_image_input(self, image_input):
        return self.reduce_items(super()._process_image_input(image_input))
