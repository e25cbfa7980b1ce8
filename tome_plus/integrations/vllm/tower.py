"""LLaVA-1.5's CLIP tower in vLLM reducing inside its own layers (`site="tower"`, ToMe's place in
a ViT), with the same record, schedule and layer step as tome_plus's HF tower site
(`backends.hf_clip`): each encoder layer of vLLM's tower runs `reduce.prenorm_layer` over vLLM's
own norms, fused q/k/v projection and MLP. The projector takes any count, so an image gives the
features that reach the feature layer (`vision_feature_layer`, the class token dropped by the
`default` strategy), a count fixed by the schedule: decided before scheduling, as vLLM requires.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...backends import hf_clip
from ...backends.base import PatchInfo
from ...prop_attn import cached_padded_qkv
from ...reduce import QKV, attention_with_signals, prenorm_layer
from ...vlm.images import layers_feeding


def tower_record(method: str, reducer, config, hf_config) -> PatchInfo:
    """The tower's patch record for the served method (its reducer and config)."""
    return hf_clip.prepare_config(hf_config.vision_config, True, False, reducer, config, method,
                                  reduce_depth=layers_feeding(hf_config.vision_config.num_hidden_layers,
                                                              hf_config.vision_feature_layer))


def removed(record: PatchInfo, hf_config) -> int:
    """Tokens the tower's layers remove from each image (never its class token): the schedule
    for its patches and class token, solved strictly (an unreachable budget raises)."""
    vision = hf_config.vision_config
    return sum(record.removals((vision.image_size // vision.patch_size) ** 2 + 1, strict=True))


def layer_qkv(attn: nn.Module, batch: int, n_tokens: int) -> QKV:
    """How vLLM's CLIP attention projects (one fused q/k/v GEMM, the heads of this rank)."""
    heads, head_dim = attn.num_heads_per_partition, attn.head_dim

    def project(h: torch.Tensor):
        qkv, _ = attn.qkv_proj(h)
        return tuple(t.reshape(batch, n_tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))

    padded = lambda: cached_padded_qkv(attn, [attn.qkv_proj.weight], [attn.qkv_proj.bias], heads, head_dim)
    return QKV(project, padded, heads, head_dim, float(attn.scale), sdpa_scale=float(attn.scale))


def reduced_features(vision_model: nn.Module, pixel_values: torch.Tensor, record: PatchInfo,
                     strategy: str) -> torch.Tensor:
    """vLLM's `CLIPVisionTransformer.forward` (which vLLM builds up to the feature layer), each
    layer reducing as the record's schedule says; `[B, count, D]` features after `strategy`."""
    from vllm.model_executor.models.vision import resolve_visual_encoder_outputs
    x = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    state = record.new_state(x)
    for layer in vision_model.encoder.layers:
        def attention(h, needs, layer=layer):
            h = layer.layer_norm1(h)
            out, signals = attention_with_signals(h, state, needs, layer_qkv(layer.self_attn, h.shape[0], h.shape[1]),
                                                  size_channel=hf_clip.SIZE_CHANNEL)
            return layer.self_attn.out_proj(out)[0], signals

        x, state = prenorm_layer(x, state, attention, lambda h, layer=layer: layer.mlp(layer.layer_norm2(h)))
    return resolve_visual_encoder_outputs(x, vision_model.post_layernorm, feature_select_strategy=strategy)
