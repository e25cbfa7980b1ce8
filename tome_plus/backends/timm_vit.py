"""timm backend: `VisionTransformer` and its relatives (DeiT, distilled DeiT, DeiT-3, DINOv2 with
registers, CLIP/SigLIP ViTs in timm), timm 1.x.

Each block reduces between attention and MLP. Attention runs through
`F.scaled_dot_product_attention` with proportional attention as an additive `[B, 1, 1, N]` key
bias; explicit attention probabilities are computed only in layers whose method asks for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.layers import Attention
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer

from ..merging import apply_plan
from ..methods.base import ReductionConfig, Reducer
from ..schedule import VitCost
from ..state import TokenState
from ..prop_attn import pad_qkv, padded_head_dim, split_padded, write_size_channel
from .base import SCRATCH, PatchInfo, get_info, original_class, swap_class

# Proportional attention through the extra q/k channel (fast SDPA); False falls back to the additive
# mask everywhere (kept for comparison and debugging: both give the same logits).
SIZE_CHANNEL = True

FAMILY = "timm VisionTransformer (ViT, DeiT, distilled DeiT, DeiT-3, DINOv2 incl. registers, timm CLIP/SigLIP ViTs)"


def matches(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def attention_with_signals(attn: Attention, x: torch.Tensor, state: TokenState, needs: FrozenSet[str],
                           owner: nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """timm `Attention.forward` that also returns the signals a reducer asked for.

    Fused SDPA unless `"attn"` is needed; `"cls_attn"` costs one extra `q_cls K^T` row; `"k"` (the
    per-head keys, a view) is free and `"keys"` (their head average) one mean. Proportional
    attention runs as the extra q/k channel of `prop_attn.py` (the qkv GEMM writes the padded
    layout) where it can, and as an additive key bias otherwise (explicit attention, qk-norm).
    """
    batch, n_tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    attn_dim = getattr(attn, "attn_dim", heads * head_dim)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    dropout = attn.attn_drop.p if attn.training else 0.0
    # a log-size channel exists only where `prepare` chose the channel (`uses_size_channel`: no
    # qk-norm, a merging method); SIZE_CHANNEL is read again so it can be switched after `patch`
    size_channel = SIZE_CHANNEL and state.log_size is not None and "attn" not in needs
    bias = None
    if size_channel:
        weight, qkv_bias = padded_qkv(owner, attn)
        q, k, v = split_padded(F.linear(x, weight, qkv_bias), heads, head_dim)
        write_size_channel(k, head_dim, state.log_size)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=attn.scale)
    else:
        qkv = attn.qkv(x).reshape(batch, n_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = state.attn_bias(x.dtype)

    signals: Dict[str, torch.Tensor] = {}
    if "attn" in needs:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        signals["attn"] = probs
        out = attn.attn_drop(probs) @ v
    else:
        if not size_channel:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        if "cls_attn" in needs:
            # with the size channel, q'k' already carries log s
            logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            signals["cls_attn"] = logits.softmax(dim=-1)[:, :, 0]
    k = k[..., :head_dim]
    if "k" in needs:
        signals["k"] = k
    if "keys" in needs:
        signals["keys"] = k.mean(dim=1)

    out = out.transpose(1, 2).reshape(batch, n_tokens, attn_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), signals


def padded_qkv(owner: nn.Module, attn: Attention) -> Tuple[torch.Tensor, torch.Tensor]:
    """The size-channel qkv weight and bias of `attn`, cached on the patched block `owner`.

    Rebuilt (differentiably) whenever gradients may flow, a compiler traces or the weights are
    inference tensors (no version counter); otherwise cached and rebuilt when a parameter's version
    (in-place updates, `load_state_dict`), storage (`.to()`), dtype or the inference mode changes.
    Updates that bypass the version counter (fused optimizer steps, writes through `.data`, FSDP
    refills) are covered by `train()`/`eval()` dropping the cache, and by `tome_plus.refresh(model)`.
    """
    weight, bias = attn.qkv.weight, attn.qkv.bias
    params = (weight,) if bias is None else (weight, bias)
    if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.jit.is_tracing() \
            or torch.compiler.is_compiling() or any(p.is_inference() for p in params):
        return pad_qkv(weight, bias, attn.num_heads, attn.head_dim)
    key = (torch.is_inference_mode_enabled(),) + tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
    cached = owner.__dict__.get(SCRATCH)
    if cached is None or cached[0] != key:
        cached = (key, *pad_qkv(weight, bias, attn.num_heads, attn.head_dim))
        owner.__dict__[SCRATCH] = cached
    return cached[1], cached[2]


class ReducingBlock:
    """Mixin for timm `Block`: reduce tokens between attention and MLP when given a state."""

    def forward(self, x: torch.Tensor, *args, state: Optional[TokenState] = None, **kwargs):
        if state is None:  # called outside a patched forward: behave as the original block
            return super().forward(x, *args, **kwargs)
        layer, n_remove = state.layer, state.removals[state.layer]
        needs = state.reducer.needs_at(layer) if n_remove > 0 else frozenset()
        y, signals = attention_with_signals(self.attn, self.norm1(x), state, needs, self)
        x = x + self.drop_path1(self.ls1(y))
        if n_remove > 0:
            x, state = apply_plan(state.reducer.plan(signals, state, n_remove), x, state)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state.replace(layer=layer + 1, counts=state.counts + (x.shape[1],))

    def train(self, mode: bool = True):
        # weights may have changed without a version bump (fused optimizers): derive them afresh
        self.__dict__.pop(SCRATCH, None)
        return super().train(mode)


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Back onto the input tokens: each takes the value of the token holding it (0 if pruned)."""
    out = x.gather(1, source.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.masked_fill(source.unsqueeze(-1) < 0, 0.0)


class ReducingViT:
    """Mixin for timm `VisionTransformer`: runs the blocks with a per-forward `TokenState`."""

    def _run_blocks(self, x: torch.Tensor, trace: bool = False, take: Optional[List[int]] = None,
                    stop: Optional[int] = None):
        state = get_info(self).new_state(x, trace=trace)
        taken = []
        blocks = self.blocks if stop is None else self.blocks[:stop + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x, state = checkpoint(blk, x, state=state, use_reentrant=False)
            else:
                x, state = blk(x, state=state)
            if take is not None and i in take:
                taken.append((x, state))
        return x, state, taken

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        _no_masks(attn_mask, is_causal)
        x, state, _ = self._run_blocks(self._embed(x))
        x = self.norm(x)
        info = get_info(self)
        if type(self).forward_head is VisionTransformer.forward_head and "forward_head" not in self.__dict__:
            # timm's head, with this forward's sizes handed to the pooling directly: nothing
            # another (nested, concurrent) forward could overwrite
            x = self.fc_norm(self._pool_sized(x, state.size))
            x = self.head(self.head_drop(x))
        else:  # e.g. distilled DeiT, or a head of the user's: it may pool through `self.pool`
            info.remember_features(x, state.size)
            x = self.forward_head(x)
        info.last_state = state
        return x

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        _no_masks(attn_mask, is_causal)
        x, state, _ = self._run_blocks(self._embed(x))
        x = self.norm(x)
        info = get_info(self)
        info.remember_features(x, state.size)
        info.last_state = state
        return x

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """Average pooling weighs each token by its size, so it averages over the input patches.

        Sizes are known for the very tensor a `forward_features` call returned (so
        `forward_head(forward_features(x))` pools like `forward(x)`); any other input pools as
        timm does.
        """
        return self._pool_sized(x, get_info(self).features_size(x), pool_type)

    def _pool_sized(self, x: torch.Tensor, size: Optional[torch.Tensor],
                    pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if (size is None or not get_info(self).config.weighted_pool or self.attn_pool is not None
                or pool_type not in ("avg", "avgmax")):
            return super().pool(x, pool_type)
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens, weights = x[:, start:], size[:, start:]
        # float32: bf16 cannot count past 256 patches exactly
        mean = ((tokens.float() * weights).sum(dim=1) / weights.sum(dim=1)).to(x.dtype)
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """timm's `forward_intermediates`, with every intermediate un-merged onto the full patch
        grid (each patch takes the value of the token that holds it; pruned patches are zero), so
        both NCHW and NLC outputs have the unpatched model's shapes."""
        _no_masks(attn_mask, is_causal)
        assert output_fmt in ("NCHW", "NLC"), "Output format must be one of NCHW or NLC."
        take, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x, state, taken = self._run_blocks(self._embed(x), trace=True, take=list(take),
                                           stop=max_index if stop_early else None)
        get_info(self).last_state = state
        p = self.num_prefix_tokens
        full = [unmerge(self.norm(y) if norm else y, state.source) for y, state in taken]
        prefix = [y[:, :p] for y in full] if p else None
        inter = [y[:, p:] for y in full]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.dynamic_feat_size((height, width))
            inter = [y.reshape(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if output_dict:
            out = {"image_intermediates": inter}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (self.norm(x), inter)


def _no_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask/is_causal cannot follow tokens through a reduction; "
                         "call tome_plus.unpatch(model) for masked attention")


def check(model: nn.Module) -> None:
    """Raise TypeError for ViT variants whose blocks this backend does not reimplement."""
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block) or original_class(blk).forward is not Block.forward:
            raise TypeError(f"block {i} is {type(blk).__name__}; the timm backend supports timm's "
                            f"pre-norm `Block` (not ResPostBlock, ParallelScalingBlock, ...)")
        if type(blk.attn) is not Attention:
            raise TypeError(f"block {i} uses {type(blk.attn).__name__}; the timm backend supports "
                            f"timm's `Attention` (no RoPE / diff attention)")


def depth(model: nn.Module) -> int:
    return len(model.blocks)


def default_tokens(model: nn.Module) -> int:
    """Tokens entering the first block at the model's default image size."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


@dataclass(frozen=True)
class VitCostModel:
    """FLOPs model of one timm ViT for the schedule solver: `n_tokens -> VitCost` (picklable)."""

    dim: int
    attn_dim: int
    hidden: int
    depth: int
    n_prefix: int
    patch_flops: float  # embedding FLOPs per patch
    head_flops: float
    qk_dim: int = 0  # q/k width with the size channel (0: the channel never runs)

    def __call__(self, n_tokens: int) -> VitCost:
        return VitCost(dim=self.dim, attn_dim=self.attn_dim, hidden=self.hidden, depth=self.depth,
                       embed_flops=(n_tokens - self.n_prefix) * self.patch_flops, head_flops=self.head_flops,
                       qk_dim=self.qk_dim, pad_after_merge=self.qk_dim > 0)


def cost_model(model: nn.Module, size_channel: bool = False) -> VitCostModel:
    """FLOPs model of `model` for the schedule solver; `size_channel`: proportional attention will
    run through the padded q/k channel once something merged."""
    blk = model.blocks[0]
    proj = model.patch_embed.proj
    patch_area = proj.kernel_size[0] * proj.kernel_size[1] if hasattr(proj, "kernel_size") else 0
    n_heads_out = model.num_classes * (2 if hasattr(model, "head_dist") else 1)
    attn = blk.attn
    return VitCostModel(dim=model.embed_dim, attn_dim=getattr(attn, "attn_dim", attn.num_heads * attn.head_dim),
                        hidden=blk.mlp.fc1.out_features, depth=len(model.blocks), n_prefix=model.num_prefix_tokens,
                        patch_flops=2.0 * getattr(proj, "in_channels", 3) * patch_area * model.embed_dim,
                        head_flops=2.0 * model.embed_dim * n_heads_out,
                        qk_dim=attn.num_heads * padded_head_dim(attn.head_dim) if size_channel else 0)


def uses_size_channel(model: nn.Module, reducer: Reducer, config: ReductionConfig) -> bool:
    """Whether proportional attention will run as the padded q/k channel in this model."""
    return (SIZE_CHANNEL and config.prop_attn and reducer.merges
            and all(isinstance(b.attn.q_norm, nn.Identity) and isinstance(b.attn.k_norm, nn.Identity)
                    for b in model.blocks))


def prepare(model: nn.Module, reducer: Reducer, config: ReductionConfig, method: str) -> PatchInfo:
    """Check the model and describe it for `reducer`; changes nothing yet."""
    check(model)
    channel = uses_size_channel(model, reducer, config)
    return PatchInfo(method=method, config=config, reducer=reducer, depth=len(model.blocks),
                     n_prefix=model.num_prefix_tokens, has_cls=getattr(model, "cls_token", None) is not None,
                     cost=cost_model(model, channel),
                     log_size_scale=1.0 / float(model.blocks[0].attn.scale) if channel else None)


def install(model: nn.Module, info: PatchInfo) -> None:
    """Swap in the reducing classes (the model must be unpatched)."""
    for blk in model.blocks:
        swap_class(blk, ReducingBlock, info)
    swap_class(model, ReducingViT, info)
