"""The decoders a patched language model runs (`llm.decoder.PruningDecoder`, the KV-cache engine),
one row each (`DecoderAdapter`), keyed by the text model's `config.model_type`.

A row says what the loop must know of a decoder's layers: its rotary positions ("1d", or "mrope":
Qwen2-VL's temporal/height/width rows, which reach the rotary embedding as given; per layer type
or not), whether its attention normalizes q and k, what a sliding window gets, whether an image's
tokens attend to each other both ways (Gemma 3) and whether DeepStack features join the first
layers (Qwen3-VL). The loop runs what every current row says; a row that asks for what it does
not implement is refused at `patch` by name (`check_decoder`), never run half-right. `vlm.families` names the
decoder row of each vision-language family; the class names are checked against the installed
transformers by `tests/test_families.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn


@dataclass(frozen=True)
class DecoderAdapter:
    """One decoder the loop has been checked on."""

    model_type: str  # the text model's `config.model_type`
    model: str  # its decoder class in transformers (`LlamaModel`); a subclass matches too
    rotary: str = "1d"  # "1d" (position ids [B, N]) or "mrope" ([3, B, N] or [4, B, N], as given)
    # RMS-norm on q and k per head (Qwen3, Gemma 3): HF's layers apply it themselves; where the loop
    # forms q and k (`features.heads`) it applies the attention's `q_norm` / `k_norm`
    qk_norm: bool = False
    # a sliding window in use: "refused" (Mistral's: refused when set), or "masked" (Gemma 3's sliding
    # layers: the loop's masks bound each query's look-back by the window, in conversation columns
    # as HF's do, and those layers' cache keeps every slot, as a full layer's)
    sliding_window: str = "refused"
    # an image's tokens attend each other both ways (Gemma 3, where the call gives `token_type_ids`:
    # each run of image tokens is a block, as HF's masks make it); the kept ones still do after a site
    bidirectional_image: bool = False
    # rotary angles per layer type (Gemma 3: local and global bases, `rotary_emb(x, ids, layer_type)`)
    layer_rotary: bool = False
    # linear-attention layers among the full ones (Qwen3.5's Gated DeltaNet): a recurrent state per row,
    # no keys per token. Tokens removed before the first layer (the features site) are never seen; the
    # LLM methods (which rank by a site layer's attention probabilities) and KV policies (which forget
    # one token's slot) are refused by name (`LINEAR`)
    linear_attention: bool = False
    # Qwen3-VL's DeepStack: visual features of several tower layers added to the visual tokens' hidden
    # states after the first decoder layers (`deepstack_visual_embeds`, `visual_pos_masks`)
    deepstack: bool = False


DECODERS: Dict[str, DecoderAdapter] = {row.model_type: row for row in (
    DecoderAdapter("llama", "LlamaModel"),
    DecoderAdapter("mistral", "MistralModel"),
    DecoderAdapter("qwen2", "Qwen2Model"),
    DecoderAdapter("qwen3", "Qwen3Model", qk_norm=True),
    DecoderAdapter("qwen3_5_text", "Qwen3_5TextModel", rotary="mrope", qk_norm=True, linear_attention=True),
    DecoderAdapter("qwen3_5_moe_text", "Qwen3_5MoeTextModel", rotary="mrope", qk_norm=True, linear_attention=True),
    DecoderAdapter("gemma3_text", "Gemma3TextModel", qk_norm=True, sliding_window="masked", bidirectional_image=True,
                   layer_rotary=True),
    DecoderAdapter("qwen2_vl_text", "Qwen2VLTextModel", rotary="mrope"),
    DecoderAdapter("qwen2_5_vl_text", "Qwen2_5_VLTextModel", rotary="mrope"),
    # DeepStack: the loop adds each kept token's deep features after the first layers (`deepstack`)
    DecoderAdapter("qwen3_vl_text", "Qwen3VLTextModel", rotary="mrope", qk_norm=True, deepstack=True),
    DecoderAdapter("qwen3_vl_moe_text", "Qwen3VLMoeTextModel", rotary="mrope", qk_norm=True, deepstack=True),
)}
# what the loop implements of each field; a row asking for anything else is refused at `patch`
SUPPORTED = {"rotary": ("1d", "mrope"), "qk_norm": (False, True), "sliding_window": ("refused", "masked"),
             "bidirectional_image": (False, True), "layer_rotary": (False, True), "linear_attention": (False, True)}
NOT_YET = {"rotary": "rotary positions {value!r}", "qk_norm": "q/k-norm in the attention",
           "sliding_window": "sliding window {value!r}", "bidirectional_image": "attention both ways within an image",
           "layer_rotary": "rotary angles per layer type", "linear_attention": "linear-attention layers"}
# why a decoder with linear-attention layers refuses what reduces inside it (`check_decoder`'s `kind`)
LINEAR = {
    "llm": "its linear-attention layers form no attention probabilities to rank tokens by, and the methods that "
           "prune between layers rank by a site layer's; reduce the image features before the first layer "
           "(site='features') instead",
    "kv": "its linear-attention layers hold a recurrent state per row, which cannot forget one token's slot",
    "attention": "its first layer is a linear-attention layer, which forms no attention among the image's tokens "
                 "for this method to read; use tome, pitome or divprune at site='features'",
}


def decoder_adapter(model: nn.Module) -> Optional[DecoderAdapter]:
    """The row of a decoder module (`config.model_type`'s, where the module is of its class; else
    the row of a class in its MRO, as for a subclass with a config of its own), or None."""
    names = {c.__name__ for c in type(model).__mro__}
    row = DECODERS.get(getattr(getattr(model, "config", None), "model_type", None))
    if row is not None and row.model in names:
        return row
    return next((row for row in DECODERS.values() if row.model in names), None)


def decoder_names() -> str:
    """The decoders' class names, for messages: "LlamaModel, MistralModel, ..."."""
    return ", ".join(row.model for row in DECODERS.values())


def unsupported(row: DecoderAdapter) -> List[str]:
    """What `row` asks for that the loop does not implement yet (empty for every current row)."""
    return [NOT_YET[name].format(value=getattr(row, name)) for name, allowed in SUPPORTED.items()
            if getattr(row, name) not in allowed]


def rope_positions(row: DecoderAdapter, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(what the rotary embedding takes, the text positions `[B or 1, N]`) from a forward's
    position ids. An "mrope" row's `[3, B, N]` temporal/height/width rows (or `[4, B, N]` with the
    text positions first) reach the rotary embedding as given, and the text row stands for the
    tokens' positions (the survivors of a site keep their angles: `segments.compact` takes cos and
    sin); a "1d" row's ids are both. Used by `decoder.PruningDecoder`."""
    if row.rotary == "mrope" and position_ids.dim() == 3:
        return (position_ids[1:] if position_ids.shape[0] == 4 else position_ids), position_ids[0]
    return position_ids, position_ids


def layer_types(model: nn.Module) -> Optional[List[str]]:
    """Each layer's type where the decoder's row has rotary angles or masks per layer type (Gemma
    3's "sliding_attention" / "full_attention"), else None: one kind of layer."""
    row = decoder_adapter(model)
    if row is None or not (row.layer_rotary or row.sliding_window == "masked" or row.linear_attention):
        return None
    return list(model.config.layer_types[:len(model.layers)])


def explicit_masks(row: DecoderAdapter) -> bool:
    """Whether every layer takes a mask built by the loop (`segments.segment_mask`): attention both
    ways within an image or a window bound cannot be told to HF's flash / flex masks here."""
    return row.bidirectional_image or row.sliding_window == "masked"


def matches_decoder(model: nn.Module) -> bool:
    """A decoder with a row in `DECODERS` without a sliding window in use (the row's
    `sliding_window="refused"`): the masks built after a pruning site know no window."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layers = getattr(model, "layers", None)
    row = decoder_adapter(model)
    refused = row is not None and row.sliding_window == "refused"
    return row is not None and not (window and refused) and layers is not None and len(layers) > 0


def check_decoder(model: nn.Module, label: str, kind: str = "llm") -> DecoderAdapter:
    """The row of a language model whose layers `label` (a method at its site, a KV policy) can run
    with tokens pruned between them; refused by name otherwise. Used by `vlm.sites.check_decoder`
    and `kv.engine.check_decoder`; `kind` says what `label` does there: "features" (a vision method
    before the first layer), "attention" (one that reads the first layer's attention there), "llm"
    (pruning between layers) or "kv" (a KV-cache policy)."""
    if not matches_decoder(model):
        raise TypeError(f"the language model is {type(model).__name__}; {label} supports "
                        f"{decoder_names()} (without a sliding window in use)")
    row = decoder_adapter(model)
    missing = unsupported(row)
    if kind == "kv" and explicit_masks(row):
        raise TypeError(f"the language model is {type(model).__name__} ({row.model_type!r}); {label} does not fit: "
                        f"the KV engine's per-head masks do not hold its image blocks attending both ways or its "
                        f"sliding windows yet")
    if row.linear_attention and kind in LINEAR:
        raise TypeError(f"the language model is {type(model).__name__} ({row.model_type!r}); {label} does not fit: "
                        f"{LINEAR[kind]}")
    if missing:
        raise TypeError(f"the language model is {type(model).__name__} ({row.model_type!r}); {label} does not "
                        f"support {', '.join(missing)} yet")
    return row
