"""HF transformers backend: CLIP and SigLIP vision encoders (`CLIPVisionModel`,
`SiglipVisionModel`), the vision towers of LLaVA-style models.

Each encoder layer reduces through the shared step of `reduce.py`: fused SDPA, proportional
attention as the extra q/k channel (the q, k, v projections fused into one padded GEMM), explicit
attention only where a method asks for it. The class token (CLIP) is the protected prefix; SigLIP
has none. Pooling follows the sizes: CLIP's pooler reads the class token (untouched); SigLIP's
attention-pool head adds `log(size)` to its probe's logits, so a merged token weighs as the
patches it stands for (`weighted_pool=False` turns that off).

The hidden states HF reports (`output_hidden_states`) have each layer's reduced length.
`torch.export` and `torch.jit.trace` record a patched tower's schedule. Where nothing reduces,
`torch.jit.script` compiles the original classes (so it fails where transformers' own tower does)
and an FX trace that reaches the encoder traces the original one; otherwise both refuse with one
line naming those two (`base`). `symbolic_trace` of the tower itself always refuses: its `*args`
forward gets one Proxy for all arguments (the unpatched tower does not trace either).
Imported only for models from transformers: the timm path never imports it.
"""
from __future__ import annotations

import contextvars
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.fx.proxy import TraceError
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel
from transformers.models.siglip.modeling_siglip import (SiglipEncoderLayer, SiglipMultiheadAttentionPoolingHead,
                                                        SiglipVisionModel)

from ..methods.base import ReductionConfig, Reducer
from ..prop_attn import SCRATCH, cached_padded_qkv, padded_head_dim
from ..reduce import QKV, attention_with_signals, prenorm_layer
from ..schedule import VitCostModel
from ..state import TokenState
from ..warn import warn_caller
from . import base
from .base import (EXPORT_HINT, FX_REFUSAL, PatchInfo, fx_original, get_info, is_fx_proxy, original_class,
                   prepare_scriptable, swap_class, tag)

SIZE_CHANNEL = True  # as in timm_vit: False runs proportional attention as an additive mask

KIND = "hf"
HEADS = False  # a vision tower: no classifier head to replace
LLM_METHODS = False
SITES: tuple = ()  # one place: the encoder's own layers
KV = False  # no decoder, no KV cache
FAMILY = "HF transformers CLIPVisionModel / SiglipVisionModel"
TOWERS = (CLIPVisionModel, SiglipVisionModel)
LAYERS = (CLIPEncoderLayer, SiglipEncoderLayer)
model_name = base.model_name  # HF's `config._name_or_path`
last_forward = base.last_forward

# The final state of the encoder run inside the current tower forward, for SigLIP's pooling head.
# A context variable because HF's own code is the only path between the two: the vision model's
# forward (`SiglipVisionModel.forward`) calls the encoder, then `post_layernorm`, then
# `head(hidden_state)` with that new tensor alone, so no argument or tensor the head receives can
# carry the state. `ReducingTower` opens it around HF's forward,
# `ReducingEncoder` fills it, `SizedAttentionPool` reads it; nested and concurrent forwards each
# see their own.
_SCOPE: contextvars.ContextVar[Optional[Dict[str, TokenState]]] = contextvars.ContextVar("tome_plus_hf_scope",
                                                                                          default=None)


def matches(model: nn.Module) -> bool:
    return isinstance(model, TOWERS)


def has_cls(tower: nn.Module) -> bool:
    return hasattr(tower.embeddings, "class_embedding")


def layer_qkv(layer: nn.Module, batch: int, n_tokens: int) -> QKV:
    """How an HF CLIP/SigLIP attention projects (separate q, k, v; no qk-norm)."""
    attn = layer.self_attn
    heads, head_dim = attn.num_heads, attn.head_dim

    def project(h: torch.Tensor):
        shape = (batch, n_tokens, heads, head_dim)
        return tuple(p(h).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    padded = lambda: cached_padded_qkv(layer, [p.weight for p in projections], [p.bias for p in projections],
                                       heads, head_dim)
    return QKV(project, padded, heads, head_dim, float(attn.scale),
               attn.dropout if attn.training else 0.0, sdpa_scale=float(attn.scale))


class ReducingEncoderLayer:
    """Mixin for `CLIPEncoderLayer` / `SiglipEncoderLayer`: returns `(x, state)` when given a state
    (HF's hidden-state hooks read element 0)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *args,
                state: Optional[TokenState] = None, **kwargs):
        if state is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        batch, _, _ = hidden_states.shape

        def attention(h, needs):
            h = self.layer_norm1(h)
            out, signals = attention_with_signals(h, state, needs, layer_qkv(self, batch, h.shape[1]),
                                                  size_channel=SIZE_CHANNEL)
            return self.self_attn.out_proj(out), signals

        return prenorm_layer(hidden_states, state, attention, lambda h: self.mlp(self.layer_norm2(h)))

    def train(self, mode: bool = True):
        self.__dict__.pop(SCRATCH, None)  # weights may have changed without a version bump
        return super().train(mode)

    def __prepare_scriptable__(self):
        return prepare_scriptable(self, None, None)  # alone (no state) it is the original layer


class ReducingEncoder:
    """Mixin for `CLIPEncoder` / `SiglipEncoder`: runs the layers with a per-forward `TokenState`."""

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if is_fx_proxy(inputs_embeds):
            return fx_original(self, get_info(self), None, "forward", inputs_embeds, attention_mask, **kwargs)
        if attention_mask is not None or kwargs.get("is_causal"):
            raise ValueError("attention masks cannot follow tokens through a reduction; "
                             "call tome_plus.unpatch(model) for masked attention")
        if kwargs.get("output_attentions"):  # e.g. LLaVA asked for the LLM's: those still come
            warn_caller("the vision tower's attention maps are not recorded while it is patched (its attention "
                        "runs fused); call tome_plus.unpatch(model) to get them")
        info = get_info(self)
        state = info.new_state(inputs_embeds)
        x = inputs_embeds
        for layer in self.layers:
            x, state = layer(x, None, state=state, **kwargs)
        scope = _SCOPE.get()
        if scope is not None:
            scope["state"] = state
        info.last_state = state
        return BaseModelOutput(last_hidden_state=x)

    def __prepare_scriptable__(self):
        return prepare_scriptable(self, get_info(self), None)


def keep_output_recording(model: nn.Module) -> None:
    """transformers records `output_hidden_states` through hooks it looks up by the model's class
    name; give the patched class the original's entry. (In a process that unpickled the model the
    original's entry may be missing too: transformers itself then records nothing.)"""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:  # transformers without that registry records outputs another way
        return
    name = str(type(model))
    if dict.get(registry, name) is None:
        flags = dict.get(registry, str(original_class(model)))
        if flags is not None:
            dict.__setitem__(registry, name, flags)


class ReducingTower:
    """Mixin for the vision model: opens the scope in which its pooling head finds this forward's sizes."""

    def forward(self, *args, **kwargs):
        if is_fx_proxy(args) or is_fx_proxy(kwargs):  # symbolic_trace of the tower itself: one `*args` Proxy
            if tower_record(self).reduces():
                raise TraceError(FX_REFUSAL)
            raise TraceError(f"tome_plus: torch.fx.symbolic_trace cannot map its Proxy for `*args` onto "
                             f"{original_class(self).__name__}'s arguments; " + EXPORT_HINT)
        if any(is_fx_proxy(a) for a in (*args, *kwargs.values())):
            return fx_original(self, tower_record(self), None, "forward", *args, **kwargs)
        keep_output_recording(self)
        token = _SCOPE.set({})
        try:
            return super().forward(*args, **kwargs)
        finally:
            _SCOPE.reset(token)

    def __prepare_scriptable__(self):
        return prepare_scriptable(self, tower_record(self), None)


def tower_record(tower: nn.Module) -> PatchInfo:
    """The patch record of a tower: on it (patched alone) or on its encoder (inside LLaVA)."""
    return get_info(tower) or get_info(tower.encoder)


class SizedAttentionPool:
    """Mixin for SigLIP's attention-pool head: the probe's logits get `log(size)` of every token."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        scope = _SCOPE.get()
        state = scope.get("state") if scope is not None else None
        if state is None or state.size is None or not get_info(self).config.weighted_pool:
            return super().forward(hidden_state)
        batch, n_tokens, _ = hidden_state.shape
        heads = self.attention.num_heads
        bias = state.size.log().to(hidden_state.dtype).transpose(1, 2)  # [B, 1, N]
        bias = bias.repeat_interleave(heads, dim=0)  # [B * heads, 1, N], as nn.MultiheadAttention wants
        probe = self.probe.repeat(batch, 1, 1)
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=bias, need_weights=False)[0]
        residual = hidden_state
        hidden_state = residual + self.mlp(self.layernorm(hidden_state))
        return hidden_state[:, 0]

    def __prepare_scriptable__(self):
        return prepare_scriptable(self, None, None)  # outside a tower forward it pools as the original


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    return tower.encoder.layers


def check(tower: nn.Module) -> None:
    for i, layer in enumerate(encoder_layers(tower)):
        cls = original_class(layer)
        if not isinstance(layer, LAYERS) or cls.forward is not next(c for c in LAYERS if isinstance(layer, c)).forward:
            raise TypeError(f"encoder layer {i} is {cls.__name__}; the HF backend supports CLIPEncoderLayer "
                            f"and SiglipEncoderLayer")


def depth(model: nn.Module) -> int:
    return len(encoder_layers(model))


def default_tokens(model: nn.Module) -> int:
    """Tokens entering the first layer at the config's image size."""
    config = model.config
    return (config.image_size // config.patch_size) ** 2 + int(has_cls(model))


def config_cost_model(config, cls_token: bool, pool_head: bool, size_channel: bool, site: str) -> VitCostModel:
    """The FLOPs model of a CLIP/SigLIP tower from its vision config."""
    dim, heads = config.hidden_size, config.num_attention_heads
    # the attention-pool head: its MLP and projections once per image (the probe's logits are negligible)
    head_flops = 2.0 * (4 * dim * dim + 2 * dim * config.intermediate_size) if pool_head else 0.0
    return VitCostModel(dim=dim, attn_dim=dim, hidden=config.intermediate_size, depth=config.num_hidden_layers,
                        n_prefix=int(cls_token),
                        patch_flops=2.0 * config.num_channels * config.patch_size ** 2 * dim, head_flops=head_flops,
                        qk_dim=heads * padded_head_dim(dim // heads) if size_channel else 0,
                        reduce_after_mlp=site == "block")


def prepare(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str,
            reduce_depth: Optional[int] = None) -> PatchInfo:
    """Describe the tower `model` for `reducer`; `reduce_depth`: only that many leading layers reduce."""
    check(model)
    head = getattr(model, "head", None) if getattr(model, "use_head", False) else None
    info = prepare_config(model.config, has_cls(model), head is not None, reducer, config, method, reduce_depth)
    info.depth = depth(model)
    return info


def prepare_config(vision_config, cls_token: bool, pool_head: bool, reducer: Reducer, config: ReductionConfig,
                   method: str, reduce_depth: Optional[int] = None) -> PatchInfo:
    """The record of a CLIP/SigLIP tower described by its vision config alone (`prepare`; the vLLM
    plugin, whose towers are vLLM's modules)."""
    channel = SIZE_CHANNEL and config.prop_attn and reducer.merges
    scale = (vision_config.hidden_size // vision_config.num_attention_heads) ** -0.5  # CLIP's and SigLIP's
    return PatchInfo(method=method, config=config, reducer=reducer, depth=vision_config.num_hidden_layers,
                     n_prefix=int(cls_token), has_cls=cls_token,
                     cost=config_cost_model(vision_config, cls_token, pool_head, channel, reducer.site),
                     log_size_scale=1.0 / scale if channel else None, reduce_depth=reduce_depth)


def check_budget(model: nn.Module, info: PatchInfo) -> None:
    """Solve the budget at the model's default input now: its errors and warnings come from `patch`."""
    info.removals(default_tokens(model), strict=True)


def install(model: nn.Module, info: PatchInfo) -> None:
    """Swap in the reducing classes (the record lives on the patched model; inner modules are tagged)."""
    for layer in encoder_layers(model):
        swap_class(layer, ReducingEncoderLayer, info)
    swap_class(model.encoder, ReducingEncoder, info)
    swap_class(model, ReducingTower, info)
    tag(model.encoder, info)
    head = getattr(model, "head", None)
    if isinstance(head, SiglipMultiheadAttentionPoolingHead):
        swap_class(head, SizedAttentionPool, info)
        tag(head, info)
