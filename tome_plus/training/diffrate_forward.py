"""DiffRate's search forward (Chen et al., ICCV 2023; docs/methods.md, DiffRate search): a timm
ViT run with learnable per-block prune and merge counts (`DiffRateRates`), their straight-through
masks, the merge and the FLOPs, all differentiable (`search_forward`). The search that trains the
counts (its loop and recipe, checkpoints, the schedule it writes) is `training.diffrate`.

The authors' code is github.com/OpenGVLab/DiffRate (`DiffRate/ddp.py`, `DiffRate/patch/deit.py`,
`main.py`), whose semantics are the defaults here (written anew, not copied). For each block and
each of prune / merge, logits theta over the candidate kept counts {N, N - g, N - 2g, ...} (g the
granularity), zero-initialised; pi = softmax(theta), expected count k = sum_c pi_c c, rounded up
with a straight-through ceil. Tokens stay in the tensor (static shapes): each block sorts them by
the class token's attention (averaged over heads; dead tokens last), and P_i = sum_{c > i} pi_c,
the probability that sorted rank i is kept, gives straight-through masks m = hard - stopgrad(P) + P
(hard in the forward, P's gradient in the backward). A dead token leaves attention through a
masked softmax (`exp(logit) m`, renormalised: a token at m = 0 still passes the task's gradient to
P).

`straight_through` chooses how the masks and the merge carry gradient:
- "authors" (default, the authors' search): with n the tokens alive before the block, the prune
  mask is hard 0 only on ranks [k_p, n) and is applied only when k_p < n; the merge mask only on
  [k_m, min(n, k_p)), only when k_m is below that. The merge itself is hard: every source in that
  window goes into its most cosine-similar kept token (hidden states), which becomes the plain
  mean of itself and its sources; it carries no gradient to the rates (the counts learn from the
  masks in attention and from the FLOPs term). Rates whose count keeps every live token get the
  FLOPs gradient only.
- "all_ranks" (our first reading): both masks are hard 0 on every rank >= k and always applied,
  and the merge is weighted by the straight-through masks (a token merged away by
  `m_prune (1 - m_merge)`), so it carries gradient to the rates. Same forward, other gradients:
  with `size_clamp="total"` (our first version) on a random-init DeiT-S, one batch of 8 and rates
  near the published 2.9 schedule, the task gradient's cosine to the authors' is 0.75 (prune) and
  0.25 (merge), and the push on a block's count has the other sign in 3 and 5 of 11 blocks.

`size_clamp`: a merged source adds its size times its similarity to the destination's size;
"per_source" (default, the authors' search) clamps each source's share at 1 first,
max(size * sim, 1), and sources keep that share as their own size; "total" adds
size * max(sim, 0) and clamps the destination's total at 1 (what `tome_plus.patch(model,
"diffrate", ...)` runs at inference, so with "total" a schedule's forward here equals the patched
model's). Sizes enter attention as `log(size)` (`prop_attn`); average pooling weighs the live
tokens by size (the authors divide by a total without gradient in their search; so does
"authors").

Blocks that never compress: block 0 (as in the authors' search) and, for average-pooling models,
the last block (their MAE patch). FLOPs are analytic MACs per block (attention with the incoming
count, MLP with the outgoing one, min(k_p, k_m, incoming) passing its gradient to both counts and
none to the incoming one, as their straight-through minimum does), so the loss
`task + lambda (GMACs - target)^2` (lambda = 5) reaches theta through the counts too. The authors
call these GMACs "GFLOPs"; the presets' keys are in that unit.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

STRAIGHT_THROUGH = ("authors", "all_ranks")
SIZE_CLAMPS = ("per_source", "total")


class DiffRateRates(nn.Module):
    """Learnable prune and merge logits of every block over the candidate kept counts.

    `fixed`: blocks that never compress (their logits get no gradient and the schedule keeps every
    token there); `for_model` picks them as the authors do."""

    def __init__(self, depth: int, n_tokens: int, n_prefix: int, granularity: int = 4,
                 fixed: Sequence[int] = (0,)) -> None:
        super().__init__()
        self.n_tokens, self.n_prefix = n_tokens, n_prefix
        self.fixed = tuple(sorted({int(layer) % depth for layer in fixed}))
        counts = list(range(n_tokens, n_prefix, -granularity))
        self.register_buffer("candidates", torch.tensor(counts, dtype=torch.float32))
        self.prune = nn.Parameter(torch.zeros(depth, len(counts)))
        self.merge = nn.Parameter(torch.zeros(depth, len(counts)))

    @classmethod
    def for_model(cls, model: nn.Module, granularity: int = 4) -> "DiffRateRates":
        """Rates for a timm ViT: block 0 fixed, and the last block too under average pooling."""
        depth = len(model.blocks)
        fixed = (0, depth - 1) if getattr(model, "global_pool", "token") == "avg" else (0,)
        n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        return cls(depth, n_tokens, model.num_prefix_tokens, granularity, fixed)

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        """Straight-through ceil of the expected count (a float tensor carrying pi's gradient)."""
        k = (logits.softmax(-1) * self.candidates).sum(-1)
        return k + (k.ceil() - k).detach()

    def keep_probability(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """`[n]`: P_i = sum_{c > i} pi_c, the probability that sorted rank i is kept."""
        ranks = torch.arange(n, device=logits.device, dtype=torch.float32)
        return (logits.softmax(-1).unsqueeze(0) * (self.candidates.unsqueeze(0) > ranks.unsqueeze(1))).sum(-1)

    def mask(self, logits: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """("all_ranks") `[n]` straight-through keep mask, hard 0 on every rank >= the count, and the count."""
        prob, count = self.keep_probability(logits, n), self.expected(logits)
        hard = (torch.arange(n, device=logits.device) < count.detach()).float()
        return hard - prob.detach() + prob, count

    def window_mask(self, logits: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
        """("authors") `[n]` straight-through mask, hard 0 on ranks [start, stop) only, 1 elsewhere."""
        prob = self.keep_probability(logits, n)
        ranks = torch.arange(n, device=logits.device)
        hard = ((ranks < start) | (ranks >= stop)).float()
        return hard - prob.detach() + prob

    def schedule(self) -> Dict[str, Any]:
        """The searched counts as DiffRate's JSON keys (running minima, class token included)."""
        prune, merge, n = [], [], self.n_tokens
        with torch.no_grad():
            for layer, (lp, lm) in enumerate(zip(self.prune, self.merge)):
                if layer in self.fixed:
                    k_p = k_m = n
                else:
                    k_p = min(int(self.expected(lp)), n)
                    k_m = min(int(self.expected(lm)), k_p)
                prune.append(k_p)
                merge.append(k_m)
                n = k_m
        return {"prune_kept_num": prune, "merge_kept_num": merge, "n_tokens": self.n_tokens}


def block_flops(n_in: torch.Tensor, n_out: torch.Tensor, dim: int, hidden: int) -> torch.Tensor:
    """MACs of one block: attention with the incoming count, MLP with the outgoing one."""
    return 4 * n_in * dim * dim + 2 * n_in * n_in * dim + 2 * n_out * dim * hidden


def policy_softmax(logits: torch.Tensor, keep: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Softmax over the keys a mask keeps, `keep` `[B, N]` in [0, 1]: exp(logit) * keep, renormalised.
    Unlike a `log(keep)` bias it has a gradient for a key at keep = 0 (every token still sees itself)."""
    n = keep.shape[-1]
    policy = keep[:, None, None, :]
    eye = torch.eye(n, device=keep.device, dtype=keep.dtype)
    policy = policy + (1 - policy) * eye  # a dropped query still attends to itself
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * policy
    return (weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)


def ste_min(a: torch.Tensor, b: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """min(a, b, cap) in the forward; the full gradient to both a and b and none to cap in the
    backward (as the authors' search does): a plain minimum would starve the larger one, and a
    running minimum every later block, of the FLOPs gradient."""
    value = torch.minimum(torch.minimum(a, b), cap).detach()
    return value + (a - a.detach()) + (b - b.detach())


def merge_masked(x: torch.Tensor, size: torch.Tensor, moving: torch.Tensor, dest: torch.Tensor,
                 size_clamp: str = "per_source") -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge with the tokens kept in place: token i moves by `moving[i]` (`[B, N]`: 0/1, or a
    straight-through weight) into its most cosine-similar token among `dest` (`[B, N]` bool), which
    becomes the (weighted) mean of itself and what it receives; sizes as `size_clamp` says (module
    doc). Returns (x, size)."""
    with torch.no_grad():
        unit = F.normalize(x, dim=-1)
        sim = (unit @ unit.transpose(1, 2)).masked_fill(~dest.unsqueeze(1), -math.inf)
        best, dst = sim.max(dim=-1)
        best = best.clamp(min=-1.0)  # a token with no destination at all moves by 0 anyway
    received = torch.zeros_like(x).scatter_add(1, dst.unsqueeze(-1).expand_as(x), moving.unsqueeze(-1) * x)
    weight = torch.zeros_like(moving).scatter_add(1, dst, moving)
    x = (x + received) / (1 + weight).unsqueeze(-1)
    if size_clamp == "per_source":  # each source's share at least 1; a source keeps its share
        share = (size * best).clamp(min=1)
        gained = torch.zeros_like(size).scatter_add(1, dst, moving * share)
        size = torch.where(moving.detach() > 0.5, share, size) + gained
    else:  # the share of an opposed source is 0, the total at least 1
        gained = torch.zeros_like(size).scatter_add(1, dst, moving * best.clamp(min=0) * size)
        size = (size + gained).clamp(min=1)
    return x, size


def check_modes(straight_through: str, size_clamp: str) -> None:
    if straight_through not in STRAIGHT_THROUGH:
        raise ValueError(f"straight_through must be one of {STRAIGHT_THROUGH}, got {straight_through!r}")
    if size_clamp not in SIZE_CLAMPS:
        raise ValueError(f"size_clamp must be one of {SIZE_CLAMPS}, got {size_clamp!r}")


def search_forward(model: nn.Module, images: torch.Tensor, rates: DiffRateRates, prop_attn: bool = True,
                   straight_through: str = "authors", size_clamp: str = "per_source"
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ViT run with the rates' masks: (logits, pooled features after `fc_norm`, GMACs).

    Each block is the timm backend's (`attention_branch` / `mlp_branch`: qk-norm, the attention's
    output norm, gate, LayerScale and drop-path as the model has them) with the masked attention
    of the search; between attention and MLP the block sorts, masks and merges as the module doc
    says. With rates that keep every token it is the unpatched model; with rates on one schedule
    and `size_clamp="total"` it computes what `tome_plus.patch(model, "diffrate", ...)` runs.
    """
    from ..backends.timm_vit import attention_branch, embed, mlp_branch

    check_modes(straight_through, size_clamp)
    authors = straight_through == "authors"
    x = embed(model, images)  # patch embedding, position, patch dropout, norm_pre
    batch, n, dim = x.shape
    p = rates.n_prefix
    alive = x.new_ones(batch, n)  # product of the masks so far (hard forward, soft backward)
    size = x.new_ones(batch, n)
    n_alive = n  # ("authors") tokens alive, the same in every sample
    ranks = torch.arange(n, device=x.device)
    hidden = model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.proj
    macs = x.new_tensor(float((n - p) * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * dim
                              + dim * model.num_classes))
    count_in = x.new_tensor(float(n))
    for layer, blk in enumerate(model.blocks):
        seen: Dict[str, torch.Tensor] = {}

        def attend(q, k, v, blk=blk, size=size, alive=alive, seen=seen):
            logits = (q @ k.transpose(-2, -1)) * blk.attn.scale
            if prop_attn:
                logits = logits + size.log()[:, None, None, :]
            probs = policy_softmax(logits, alive)
            seen["cls"] = probs[:, :, 0].mean(1)
            return blk.attn.attn_drop(probs) @ v

        x = x + attention_branch(blk, x, attend)
        if layer in rates.fixed:
            count_out = count_in.detach()  # their minimum with fixed counts: no gradient to earlier blocks
            macs = macs + block_flops(count_in, count_out, dim, hidden)
            count_in = count_out
            x = x + mlp_branch(blk, x)
            continue
        importance = (seen["cls"] * alive).detach()
        importance[:, :p] = math.inf  # prefix first, then by importance, dead tokens last
        order = importance.argsort(dim=1, descending=True, stable=True)

        def by_token(m: torch.Tensor, order=order) -> torch.Tensor:  # `[n]` over ranks -> `[B, n]` over positions
            return torch.empty_like(alive).scatter(1, order, m.to(alive.dtype).expand(batch, -1))

        k_p, k_m = rates.expected(rates.prune[layer]), rates.expected(rates.merge[layer])
        if authors:
            kp, km = int(k_p.item()), int(k_m.item())
            new_alive = alive
            if kp < n_alive:  # prune ranks [kp, n_alive)
                new_alive = new_alive * by_token(rates.window_mask(rates.prune[layer], n, kp, n_alive))
            mid = min(n_alive, kp)
            if km < mid:  # merge ranks [km, mid) into [p, km)
                new_alive = new_alive * by_token(rates.window_mask(rates.merge[layer], n, km, mid))
                moving = by_token(((ranks >= km) & (ranks < mid)).float())
                dest = by_token((ranks < km).float()) > 0.5
                dest[:, :p] = False
                x, size = merge_masked(x, size, moving, dest, size_clamp)
                n_alive = km
            else:
                n_alive = mid
            alive = new_alive
        else:
            m_prune, _ = rates.mask(rates.prune[layer], n)
            m_merge, _ = rates.mask(rates.merge[layer], n)
            keep_p, keep_m = by_token(m_prune), by_token(m_merge)
            moving = alive * keep_p * (1 - keep_m)  # kept by the prune, dropped by the merge
            dest = keep_m.detach() * alive.detach() > 0.5
            dest[:, :p] = False
            x, size = merge_masked(x, size, moving, dest, size_clamp)
            alive = alive * keep_p * keep_m
        count_out = ste_min(k_p, k_m, count_in)
        macs = macs + block_flops(count_in, count_out, dim, hidden)
        count_in = count_out
        x = x + mlp_branch(blk, x)
    x = model.norm(x)
    if getattr(model, "global_pool", "token") == "avg":
        weights = (alive * size)[:, p:, None]
        total = weights.sum(1)
        pooled = (x[:, p:] * weights).sum(1) / (total.detach() if authors else total).clamp(min=1e-6)
    else:
        pooled = model.pool(x)
    pooled = model.fc_norm(pooled)
    return model.head(model.head_drop(pooled)), pooled, macs / 1e9

