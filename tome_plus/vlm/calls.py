"""The calls of a patched vision-language model: its `forward` and `generate`
(`PatchedVlmForGeneration`) and its inner model's `forward` (`PatchedVlmModel`) bind their
arguments by name, cut the prompt where the tower reduces, and tell the language model what the
features and llm sites need.

At the `tower` site the model makes the fewer image tokens fit the prompt: a prompt from the
unchanged processor holds the unpatched number of image placeholders per image; before anything
runs, each image's placeholder run is cut to the reduced count (`cut_call`, with
`prompt.cut_placeholders`), and `input_ids` / `inputs_embeds`, `attention_mask`, `position_ids`
and `labels` are cut with it (rows re-padded on the side the batch was padded on; position ids
renumbered as for a prompt with fewer placeholders). `generate` does this once for the prompt
(left-padded, as generation needs), counts `max_length` / `min_length` in the caller's tokens, and
hands back the caller's own prompt in front of the new tokens, so slicing the output at the prompt
length works as before. A later turn that passes the cache back with the whole conversation is cut
the same way. Prompts already cut to the reduced count pass unchanged. The inner model is patched
alike, so a call of `model.model(...)` or one with precomputed `mm_encoder_outputs` is cut too.

At the `features` and `llm` sites the prompt stays whole: the inner forward builds the
`LlmInputs` (`prompt.llm_inputs`) and hands them to the decoder (`llm.context.INPUTS`), with what
the outer entry points said (`llm.context.CALL`: the prompt's length, the answer, soft masks).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from transformers import DynamicCache
from transformers.masking_utils import create_masks_for_generate

from ..backends.base import get_info, original_class
from ..kv.engine import PrunedLayer
from ..llm import context
from .families import packed
from .images import image_counts
from .prompt import cut_placeholders, image_mask, llm_inputs, pad_token_id
from .sites import in_llm

CUT_ARGUMENTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels")  # cut with the prompt


def argument_getter(args: Dict[str, Any], extra: Dict[str, Any]) -> Callable[[str], Any]:
    """`get(name)`: a call's argument by name (`args`), else from its **kwargs (`extra`), else None."""
    return lambda name: args.get(name, extra.get(name))


def cache_argument(get: Callable[[str], Any]):
    """The cache a call was given (`cache`, or `past_key_values` as older callers name it)."""
    return get("cache") if get("cache") is not None else get("past_key_values")


def cut_call(model: nn.Module, args: Dict[str, Any], extra: Dict[str, Any], left: Optional[bool] = None
             ) -> Optional[Dict[str, Any]]:
    """Cut the prompt of one forward/generate call (its arguments by name, `extra` its **kwargs)
    in place; returns `prompt.cut_placeholders`'s result, or None where there was nothing to cut.

    Public: besides the patched forward and generate, the lmms-eval model
    (`tome_plus.integrations.lmms_eval`) calls it after a forward, on a copy of that call's
    arguments, for `"moved"` (where each kept token went), to give the logits back at the caller's
    positions."""
    get = argument_getter(args, extra)
    ids, embeds = get("input_ids"), get("inputs_embeds")
    if ids is None and embeds is None:
        return None
    pixels, encoded = get("pixel_values"), (get("mm_encoder_outputs") or {}).get("image")
    counts = placeholder_counts(model, ids, embeds, pixels, encoded, cache_argument(get), get)
    if counts is None:
        return None
    tensors = {name: get(name) for name in CUT_ARGUMENTS}
    if not packed(model):
        tensors["pad_id"] = pad_token_id(model)
    cut = cut_placeholders(image_mask(model, ids, embeds), *counts, tensors, left)
    for name in CUT_ARGUMENTS:
        if cut[name] is not None:
            (args if name in args else extra)[name] = cut[name]
    return cut


def placeholder_counts(model: nn.Module, ids, embeds, pixels, encoded, cache, get: Callable[[str], Any]
                       ) -> Optional[Tuple[int, int, Optional[int]]]:
    """What `prompt.cut_placeholders` cuts this call's prompt by: (unpatched, reduced) image tokens
    per image and the images given with it (None: not known, a later turn with the cache), from
    its pixels, its precomputed features or the cache; None where it has none of them (a decoding
    step). A packed model's prompt stays as it is: (0, 0, None)."""
    layer, strategy = get("vision_feature_layer"), get("vision_feature_select_strategy")
    if packed(model):  # only the LLM prunes: the prompt stays as it is
        return 0, 0, None
    if pixels is not None:
        n_full, n_reduced = image_counts(model, tuple(pixels.shape[-2:]), layer, strategy)
        return n_full, n_reduced, pixels.shape[0]
    if encoded is not None:  # features made earlier (by this patched tower): their length is the count
        features = encoded.pooler_output
        return image_counts(model, None, layer, strategy)[0], features[0].shape[0], len(features)
    if cache is not None and (ids if ids is not None else embeds).shape[1] > 1:
        # a later turn: the whole conversation again, whose images the cache holds cut
        n_full, n_reduced = image_counts(model, None, layer, strategy)
        return n_full, n_reduced, None
    return None


def check_cache(args: Dict[str, Any], extra: Dict[str, Any]) -> None:
    """A forward's attention mask must cover the cache and the new tokens: a mask grown from the
    processor's (uncut) one would silently shift every position."""
    get = argument_getter(args, extra)
    cache = cache_argument(get)
    mask, tokens = get("attention_mask"), get("input_ids") if get("input_ids") is not None else get("inputs_embeds")
    if not isinstance(cache, DynamicCache) or mask is None or tokens is None or cache.get_seq_length() == 0:
        return
    if any(isinstance(layer, PrunedLayer) for layer in cache.layers):
        return  # a KV policy keeps (or pruned) it: its length says nothing about the conversation
    if mask.shape[1] != cache.get_seq_length() + tokens.shape[1]:
        raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, but the cache holds {cache.get_seq_length()} "
                         f"and {tokens.shape[1]} are new: the cache holds the prompt as tome_plus cut it; pass the "
                         f"whole conversation to generate (its images are cut the same way), or cut the mask with "
                         f"tome_plus.vlm.prompt.cut_placeholders")


# every forward (each decoding step) binds its arguments: look each signature up once
_signature = functools.lru_cache(maxsize=None)(inspect.signature)


def bind(method, self: nn.Module, args, kwargs) -> inspect.BoundArguments:
    """`args`/`kwargs` of a call bound to the original `method`'s parameters (by name from here on)."""
    return _signature(method).bind(self, *args, **kwargs)


def keywords(bound: inspect.BoundArguments) -> Dict[str, Any]:
    """A bound call's arguments, every one by name (HF's decorators add config defaults by name,
    which a positional replay would collide with)."""
    out: Dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # without self
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"unexpected positional arguments {value!r}")
        else:
            out[name] = value
    return out


def var_kwargs(bound: inspect.BoundArguments) -> Dict[str, Any]:
    """The **kwargs part of a bound call (a dict, possibly empty; edited in place)."""
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return bound.arguments.setdefault(name, {})
    return {}


class _OriginalSignature:
    """Patched classes report the original `forward` signature: transformers reads it (e.g. to
    pass `logits_to_keep` and `mm_encoder_outputs` in `generate`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        parents = cls.__dict__.get("_tome_plus_parents")
        if parents is not None:
            mixin_forward = parents[0].forward
            cls.forward = functools.wraps(parents[1].forward)(lambda self, *a, **k: mixin_forward(self, *a, **k))


def bound_and_cut(model: nn.Module, args, kwargs) -> inspect.BoundArguments:
    """A forward's arguments bound by name, the prompt cut (`inspect` told how many image tokens
    it carries) and the cache checked: what both patched forwards do first."""
    bound = bind(original_class(model).forward, model, args, kwargs)
    cut = cut_call(model, bound.arguments, var_kwargs(bound))
    if cut is not None and cut["has_images"]:
        get_info(model).parts.image_tokens = cut["image_tokens"]
    if get_info(model).parts.site != "features":  # there the prompt stays whole: its mask covers the conversation
        check_cache(bound.arguments, var_kwargs(bound))
    return bound


class PatchedVlmModel(_OriginalSignature):
    """Mixin for the inner model (`LlavaModel`, ...): a prompt with the processor's placeholder
    count is cut (the tower site), or the language model is told its visual tokens (the features
    and llm sites)."""

    def forward(self, *args, **kwargs):
        bound = bound_and_cut(self, args, kwargs)
        info = get_info(self)
        if not in_llm(info):
            return super().forward(**keywords(bound))
        call = context.CALL.get()
        inputs = llm_inputs(self, argument_getter(bound.arguments, var_kwargs(bound)), call)
        if inputs.has_visual:  # videos' tokens too
            info.parts.image_tokens = inputs.visual.sum(dim=1)
        token = context.INPUTS.set(inputs)
        try:
            out = super().forward(**keywords(bound))
        finally:
            context.INPUTS.reset(token)
        if inputs.kept:
            info.parts.llm_kept, info.parts.llm_positions = torch.stack(inputs.kept), inputs.positions
            info.parts.llm_newlines = inputs.newlines
        if call.collect is not None:
            call.collect.append(inputs)
        return out


class PatchedVlmForGeneration(_OriginalSignature):
    """Mixin for the model with its LM head (`LlavaForConditionalGeneration`, ...): prompts with the
    processor's placeholder count are cut, in `forward` (labels too) and in `generate`."""

    def forward(self, *args, **kwargs):
        bound = bound_and_cut(self, args, kwargs)
        labels = bound.arguments.get("labels", var_kwargs(bound).get("labels"))
        with context.calling(answer=labels != -100 if labels is not None else None):
            return super().forward(**keywords(bound))

    def generate(self, *args, **kwargs):
        bound = bind(original_class(self).generate, self, args, kwargs)
        extra = var_kwargs(bound)
        ids = bound.arguments.get("inputs")
        if ids is None:
            ids = extra.get("input_ids")
        elif "input_ids" not in extra:  # cut it under its keyword name, hand it back positionally
            extra["input_ids"] = bound.arguments.pop("inputs")
        cut = cut_call(self, bound.arguments, extra, left=True)
        prompt = (cut["input_ids"] if cut is not None and cut["input_ids"] is not None else ids)
        with context.calling(prompt_length=prompt.shape[1] if prompt is not None else None):
            return self._generate(bound, extra, ids, cut)

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """`generate` with a static cache turns the `[batch, length]` padding mask into the layers'
        prepared masks; at the features and llm sites the decoder builds its own from the padding
        mask (each row keeps other tokens), so there it stays as given."""
        if in_llm(get_info(self)) and (attention_mask is None or attention_mask.dim() == 2):
            return attention_mask
        make = getattr(super(), "create_masks_for_generate", create_masks_for_generate)
        return make(attention_mask=attention_mask, **kwargs)

    def _generate(self, bound, extra, ids, cut):
        if cut is None or cut["removed"] == 0 and cut["input_ids"] is ids:
            return super().generate(**keywords(bound))
        # max_length / min_length count the caller's prompt, wherever they are set (an argument,
        # the generation_config passed, the model's own): the cut prompt is `removed` shorter.
        # Given as arguments, they override the config's, as HF's generate merges them
        removed = cut["removed"]
        config = bound.arguments.get("generation_config") or self.generation_config
        if extra.get("max_new_tokens") is None and config.max_new_tokens is None:
            length = extra.get("max_length", config.max_length)
            if length is not None:
                extra["max_length"] = length - removed
        min_length = extra.get("min_length", config.min_length)
        if min_length:
            extra["min_length"] = max(min_length - removed, 0)
        out = super().generate(**keywords(bound))
        if ids is None:  # from embeddings: generate returns only the new tokens
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = ids.repeat_interleave(sequences.shape[0] // ids.shape[0], dim=0)  # num_return_sequences
        restored = torch.cat([prompt, sequences[:, cut["input_ids"].shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out
