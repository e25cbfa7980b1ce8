"""HF transformers backend: text-only causal LMs of the Llama family (`LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM`). They have no visual tokens; what tome_plus does for
them is a KV-cache policy while they decode (`patch(model, kv="a2sf", ...)`, `tome_plus.kv`)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.nn as nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from ..kv import engine
from . import base
from .base import PatchInfo

KIND = "hf"
FAMILY = "HF LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (a KV-cache policy only: kv='a2sf')"
HEADS = False
LLM_METHODS = False
SITES: tuple = ()
KV = True  # a KV-cache policy runs here (`patch(..., kv=...)`)
MODELS = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
model_name = base.model_name


def matches(model: nn.Module) -> bool:
    return isinstance(model, MODELS)


def depth(model: nn.Module) -> int:
    return len(model.model.layers)


def default_tokens(model: nn.Module) -> int:
    return 0


def prepare(model: nn.Module, reducer, config, method: str, **_) -> PatchInfo:
    raise TypeError(f"{type(model).__name__} is a text-only language model: there are no visual tokens for "
                    f"{method!r}; patch(model, kv='a2sf', kv_options=...) prunes its KV cache while it decodes")


def prepare_kv(model: nn.Module, kv) -> PatchInfo:
    engine.check_decoder(model.model, kv.name)
    return PatchInfo(method=None, config=None, reducer=None, depth=depth(model), n_prefix=0, has_cls=False,
                     cost=no_cost, kv=kv)


def no_cost(n_tokens: int) -> None:
    return None


def check_budget(model: nn.Module, info: PatchInfo) -> None:
    pass


def install(model: nn.Module, info: PatchInfo) -> None:
    engine.install(model.model, info)


def last_forward(info: PatchInfo) -> Tuple[Optional[Any], Dict[str, Any]]:
    return None, {}
