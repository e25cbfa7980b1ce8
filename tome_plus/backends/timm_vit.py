"""timm backend: `VisionTransformer` and its relatives (DeiT, distilled DeiT, DeiT-3, DINOv2 with
registers, CLIP/SigLIP ViTs in timm), timm 1.x.

Each block reduces between attention and MLP, through the shared step of `reduce.py`. Attention
runs through `F.scaled_dot_product_attention`, proportional attention as the extra q/k channel of
`prop_attn.py` (an additive key bias under qk-norm); explicit attention probabilities are computed
only in layers whose method asks for them.
"""
# No `from __future__ import annotations`: torch.fx writes the root forward's annotations into the
# code it generates, which must stay real types (a string annotation breaks scripting the FX graph).
from typing import Dict, FrozenSet, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from timm.layers import Attention
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer

from ..methods.base import ReductionConfig, Reducer
from ..prop_attn import SCRATCH, cached_padded_qkv, padded_head_dim
from ..reduce import QKV, attention_with_signals as shared_attention, prenorm_layer
from ..schedule import VitCostModel
from ..state import TokenState
from . import base
from .base import PatchInfo, fx_original, get_info, is_fx_proxy, original_class, prepare_scriptable, swap_class

# Proportional attention through the extra q/k channel (fast SDPA); False falls back to the additive
# mask everywhere (kept for comparison and debugging: both give the same logits).
SIZE_CHANNEL = True

KIND = "timm"  # the family name methods see (`Reducer.for_family`)
HEADS = True  # classifiers: a tome_plus head (CLCA) may replace the model's own
LLM_METHODS = False  # no language model inside
SITES: tuple = ()  # one place: the encoder's own layers
KV = False  # no decoder, no KV cache
FAMILY = "timm VisionTransformer (ViT, DeiT, distilled DeiT, DeiT-3, DINOv2 incl. registers, timm CLIP/SigLIP ViTs)"
model_name = base.model_name  # timm's name with its tag (`vit_base_patch16_224.mae`), or the architecture alone
last_forward = base.last_forward


class ViTParts:
    """What the timm backend keeps beyond the shared record (`PatchInfo.parts`): `forward_features`'
    outputs (by identity, weakly held) -> their sizes and the head's per-forward state (CLCA's
    collected class tokens), for a later `forward_head(x)` / `pool(x)`. Keyed by the tensor itself,
    so nested or concurrent forwards never see each other's entries; they belong to this process
    (not pickled)."""

    def __init__(self) -> None:
        self.sizes = WeakIdKeyDictionary()
        self.heads = WeakIdKeyDictionary()

    def __reduce__(self):  # pickled or copied: empty again
        return type(self), ()

    def remember(self, x: torch.Tensor, size: Optional[torch.Tensor], head=None) -> None:
        """Keep the sizes (and the head's state) of a tensor `forward_features` returned; the
        entries go when the tensor does."""
        if size is not None:
            self.sizes[x] = size
        if head is not None:
            self.heads[x] = head


def matches(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def attention_with_signals(attn: Attention, x: torch.Tensor, state: TokenState, needs: FrozenSet[str],
                           owner: nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """timm `Attention.forward` that also returns the signals a reducer asked for (the shared
    `reduce.attention_with_signals`, with timm's qkv GEMM, qk-norm, gate and output projection).
    The size channel's padded qkv weight is cached on the patched block `owner`."""
    batch, n_tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = _gate(attn, x)

    def project(h: torch.Tensor):
        q, k, v = attn.qkv(h).reshape(batch, n_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    padded = lambda: cached_padded_qkv(owner, (attn.qkv.weight,), (attn.qkv.bias,), heads, head_dim)
    qkv = QKV(project, padded, heads, head_dim, float(attn.scale), attn.attn_drop.p if attn.training else 0.0)
    # a log-size channel exists only where `prepare` chose the channel (`uses_size_channel`: no
    # qk-norm, a merging method); SIZE_CHANNEL is read again so it can be switched after `patch`
    out, signals = shared_attention(x, state, needs, qkv, size_channel=SIZE_CHANNEL)
    return _output(attn, out, gate), signals


def _gate(attn: Attention, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The output gate of a gated timm `Attention` for input `x` (None where it has none)."""
    return attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None


def _output(attn: Attention, out: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """timm `Attention`'s tail on the merged heads `[B, N, C]`: output norm (`scale_attn_norm`),
    gate, projection, dropout."""
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class ReducingBlock:
    """Mixin for timm `Block`: reduce tokens between attention and MLP when given a state."""

    def forward(self, x: torch.Tensor, *args, state: Optional[TokenState] = None, **kwargs):
        if state is None:  # called outside a patched forward: behave as the original block
            return super().forward(x, *args, **kwargs)

        def attention(h, needs):
            y, signals = attention_with_signals(self.attn, self.norm1(h), state, needs, self)
            return self.drop_path1(self.ls1(y)), signals

        return prenorm_layer(x, state, attention, lambda h: self.drop_path2(self.ls2(self.mlp(self.norm2(h)))))

    def train(self, mode: bool = True):
        # weights may have changed without a version bump (fused optimizers): derive them afresh
        self.__dict__.pop(SCRATCH, None)
        return super().train(mode)

    def __prepare_scriptable__(self):
        # scripted alone, a block runs without a state, i.e. as the original block
        return prepare_scriptable(self, None, None)


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Back onto the input tokens: each takes the value of the token holding it (0 if pruned)."""
    out = x.gather(1, source.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.masked_fill(source.unsqueeze(-1) < 0, 0.0)


class ReducingViT:
    """Mixin for timm `VisionTransformer`: runs the blocks with a per-forward `TokenState`.

    Under `torch.fx.symbolic_trace` (the input is a `Proxy`) the forwards trace as the original
    class's where nothing reduces, and refuse otherwise; `torch.jit.script` compiles the original
    classes (`__prepare_scriptable__`), on the same terms (`base.fx_original`, `base.prepare_scriptable`).
    """

    def __prepare_scriptable__(self):
        return prepare_scriptable(self, get_info(self), static_tokens(self))

    def _run_blocks(self, x: torch.Tensor, trace: bool = False, take: Optional[List[int]] = None,
                    stop: Optional[int] = None):
        info = get_info(self)
        state = info.new_state(x, trace=trace)
        if info.head is not None:  # e.g. CLCA's carrier token
            x, state = info.head.start(x, state)
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

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if is_fx_proxy(x):
            return fx_original(self, get_info(self), static_tokens(self), "forward", x, attn_mask, is_causal)
        _no_masks(attn_mask, is_causal)
        x, state, _ = self._run_blocks(embed(self, x))
        info = get_info(self)
        if info.head is not None:  # it replaces the final norm and the model's head
            info.last_state = _for_inspect(state)
            return info.head.logits(state.head.collected)
        x = self.norm(x)
        if original_class(self).forward_head is VisionTransformer.forward_head and "forward_head" not in self.__dict__:
            # timm's head, with this forward's sizes handed to the pooling directly: nothing
            # another (nested, concurrent) forward could overwrite
            x = self.fc_norm(self._pool_sized(x, state.size))
            x = self.head(self.head_drop(x))
        else:  # e.g. distilled DeiT, or a head of the user's: it may pool through `self.pool`
            info.parts.remember(x, state.size)
            x = self.forward_head(x)
        info.last_state = _for_inspect(state)
        return x

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if is_fx_proxy(x):
            return fx_original(self, get_info(self), static_tokens(self), "forward_features", x, attn_mask,
                               is_causal)
        _no_masks(attn_mask, is_causal)
        x, state, _ = self._run_blocks(embed(self, x))
        x = self.norm(x)
        info = get_info(self)
        info.parts.remember(x, state.size, state.head)
        info.last_state = _for_inspect(state)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head; with a tome_plus head (CLCA), that head, for the very tensor a
        `forward_features` call returned (it aggregates class tokens of several blocks)."""
        info = get_info(self)
        if info.head is None:
            return super().forward_head(x, pre_logits=pre_logits)
        run = info.parts.heads.get(x)
        if run is None:
            raise ValueError("the CLCA head aggregates the class token of several blocks: call model(x), or "
                             "forward_head on the very tensor forward_features returned")
        return info.head.logits(run.collected, pre_logits=pre_logits)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """Average pooling weighs each token by its size, so it averages over the input patches.

        Sizes are known for the very tensor a `forward_features` call returned (so
        `forward_head(forward_features(x))` pools like `forward(x)`); any other input pools as
        timm does.
        """
        return self._pool_sized(x, get_info(self).parts.sizes.get(x), pool_type)

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
        if is_fx_proxy(x):
            return fx_original(self, get_info(self), static_tokens(self), "forward_intermediates", x, indices,
                               return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only, output_dict,
                               attn_mask, is_causal)
        _no_masks(attn_mask, is_causal)
        assert output_fmt in ("NCHW", "NLC"), "Output format must be one of NCHW or NLC."
        take, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x, state, taken = self._run_blocks(embed(self, x), trace=True, take=list(take),
                                           stop=max_index if stop_early else None)
        get_info(self).last_state = _for_inspect(state)
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


def _for_inspect(state: TokenState) -> TokenState:
    """The state `inspect` keeps: without a head's tensors (nor the autograd graph behind them)."""
    return state if state.head is None else state.replace(head=None)


def _no_masks(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask/is_causal cannot follow tokens through a reduction; "
                         "call tome_plus.unpatch(model) for masked attention")


def embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The tokens a timm ViT's first block gets from images `x`: patch embedding, position (and
    prefix tokens), patch dropout, `norm_pre`, as timm's `forward_features` has them. Runs on a
    patched or unpatched model; the patched forwards start from it, and so does code that runs
    timm's blocks itself (DiffRate's search, `tome_plus.diffrate_search.search_forward`)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def attention_branch(blk: Block, x: torch.Tensor, attend) -> torch.Tensor:
    """The residual update of a timm `Block`'s attention branch with the attention product given:
    `attend(q, k, v)` (`[B, H, N, D]` each, q and k after qk-norm, unscaled) returns `[B, H, N, D]`.
    The rest is the block's own: norm1, qkv, qk-norm, the output norm (`scale_attn_norm`), gate,
    projection, dropout, LayerScale and drop-path. For code that runs its own attention on timm's
    weights (DiffRate's search, `tome_plus.diffrate_search`)."""
    attn = blk.attn
    h = blk.norm1(x)
    batch, n_tokens, _ = h.shape
    gate = _gate(attn, h)
    q, k, v = attn.qkv(h).reshape(batch, n_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = attend(attn.q_norm(q), attn.k_norm(k), v).transpose(1, 2).reshape(batch, n_tokens, -1)
    return blk.drop_path1(blk.ls1(_output(attn, out, gate)))


def mlp_branch(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """The residual update of a timm `Block`'s MLP branch (norm2, MLP, LayerScale, drop-path)."""
    return blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


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


def static_tokens(model: nn.Module) -> Optional[int]:
    """Tokens entering the first block when the model takes one input size only (timm asserts the
    image size and no patch dropout runs), else None."""
    if (getattr(model, "dynamic_img_size", False) or not getattr(model.patch_embed, "strict_img_size", False)
            or not isinstance(getattr(model, "patch_drop", None), nn.Identity)):
        return None
    return default_tokens(model)


def cost_model(model: nn.Module, size_channel: bool = False, site: str = "attn") -> VitCostModel:
    """FLOPs model of `model` for the schedule solver; `size_channel`: proportional attention will
    run through the padded q/k channel once something merged; `site`: where the method reduces."""
    blk = model.blocks[0]
    proj = model.patch_embed.proj
    patch_area = proj.kernel_size[0] * proj.kernel_size[1] if hasattr(proj, "kernel_size") else 0
    n_heads_out = model.num_classes * (2 if hasattr(model, "head_dist") else 1)
    attn = blk.attn
    return VitCostModel(dim=model.embed_dim, attn_dim=getattr(attn, "attn_dim", attn.num_heads * attn.head_dim),
                        hidden=blk.mlp.fc1.out_features, depth=len(model.blocks), n_prefix=model.num_prefix_tokens,
                        patch_flops=2.0 * getattr(proj, "in_channels", 3) * patch_area * model.embed_dim,
                        head_flops=2.0 * model.embed_dim * n_heads_out,
                        qk_dim=attn.num_heads * padded_head_dim(attn.head_dim) if size_channel else 0,
                        reduce_after_mlp=site == "block")


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
                     cost=cost_model(model, channel, reducer.site),
                     log_size_scale=1.0 / float(model.blocks[0].attn.scale) if channel else None,
                     parts=ViTParts())


def check_budget(model: nn.Module, info: PatchInfo) -> None:
    """Solve the budget at the model's default input now: its errors and warnings come from `patch`."""
    info.removals(default_tokens(model), strict=True)


def install(model: nn.Module, info: PatchInfo) -> None:
    """Swap in the reducing classes (the model must be unpatched)."""
    for blk in model.blocks:
        swap_class(blk, ReducingBlock, info)
    swap_class(model, ReducingViT, info)
