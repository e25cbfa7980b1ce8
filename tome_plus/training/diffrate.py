"""DiffRate's search: learn per-block prune and merge counts for a FLOPs target (timm ViTs).

Chen et al., ICCV 2023; docs/methods.md, DiffRate search; the authors' code is github.com/OpenGVLab/DiffRate
(`DiffRate/ddp.py`, `DiffRate/patch/deit.py`, `main.py`), whose semantics are the defaults here
(written anew, not copied). For each block and each of prune / merge, logits theta over the
candidate kept counts {N, N - g, N - 2g, ...} (g the granularity), zero-initialised;
pi = softmax(theta), expected count k = sum_c pi_c c, rounded up with a straight-through ceil.
Tokens stay in the tensor (static shapes): each block sorts them by the class token's attention
(averaged over heads; dead tokens last), and P_i = sum_{c > i} pi_c, the probability that sorted
rank i is kept, gives straight-through masks m = hard - stopgrad(P) + P (hard in the forward,
P's gradient in the backward). A dead token leaves attention through a masked softmax
(`exp(logit) m`, renormalised: a token at m = 0 still passes the task's gradient to P).

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

The recipe (theirs, `main.py`): the backbone runs in train mode (drop-path 0.1, timm's linear rule
over depth) but stays frozen; only theta trains (AdamW, lr 0.01, no weight decay, a cosine to
0.001 stepped once per epoch: timm's `CosineLRScheduler(t_initial=epochs)` stepped with the epoch
index at each epoch's end, so the lr of epoch e is the cosine at max(e - 1, 0)); the images come
with timm's training transforms (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25), Mixup 0.8
/ CutMix 1.0 with label smoothing 0.1 and timm's SoftTargetCrossEntropy; 3 epochs of ImageNet at
a global batch of 1024. `search` takes the augmented batches, a `mixup` callable (e.g.
`timm.data.Mixup`) and the rest as arguments; the caller's train/eval mode and drop-path modules
are restored afterwards. `lr_schedule="step"` is our per-step cosine. Under `torch.distributed`
(torchrun; gloo on CPU, NCCL on GPU) the rate gradients are averaged, so every rank holds the same
rates.

The task loss: cross-entropy with labels for the model's own classes; for a backbone without them
(e.g. the DINOv2 backbone of `tome-plus fidelity`), `distill=True` uses 1 - cosine between the
searched and the unpatched model's pooled features (the latter in eval mode) instead: it asks the
reduced model to keep the unpatched features, which is what the fidelity check measures, and
needs no labels or head to train (a linear probe would tie the schedule to the probe's classes).
"""
from __future__ import annotations

import math
import os
import pickle
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .distributed import broadcast_from_first, rank as process_rank, same_start
from .loop import backward, cycle, due, set_lr, step as optimizer_step, steps_bar

STRAIGHT_THROUGH = ("authors", "all_ranks")
SIZE_CLAMPS = ("per_source", "total")
LR_SCHEDULES = ("epoch", "step")
FORMAT = "tome_plus.diffrate_search/2"
SAVE_EVERY = 50  # steps between checkpoints


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


def full_gmacs(model: nn.Module) -> float:
    """The unpatched model's MACs per image (GMACs, what DiffRate calls GFLOPs), by the same count."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.proj
    macs = (n - model.num_prefix_tokens) * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * dim
    macs += dim * model.num_classes + len(model.blocks) * block_flops(torch.tensor(float(n)), torch.tensor(float(n)),
                                                                      dim, hidden).item()
    return macs / 1e9


def learning_rate(step: int, steps: int, lr: float, min_lr: float, epoch_steps: Optional[int] = None) -> float:
    """The lr of step `step` (0-based) of `steps`: a cosine from `lr` to `min_lr`, per step, or with
    `epoch_steps` per epoch as the authors step timm's `CosineLRScheduler` (t_initial = the
    epochs; stepped with the epoch's index at its end, so epoch e runs at the cosine of e - 1)."""
    if epoch_steps:
        t, total = max(step // epoch_steps - 1, 0), math.ceil(steps / epoch_steps)
    else:
        t, total = step, steps
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))


def describe_mixup(mixup: Optional[Callable]) -> Any:
    """What a checkpoint records of a mixup callable (timm's `Mixup`: its parameters)."""
    if mixup is None:
        return None
    names = ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "mix_prob", "switch_prob", "mode", "label_smoothing")
    if all(hasattr(mixup, n) for n in names):
        return {n: getattr(mixup, n) for n in names}
    return type(mixup).__name__


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during `search`: `done` steps of `steps` ran; `saved` is the step the checkpoint
    holds (written on the way out where there was one), None if nothing was written."""

    def __init__(self, done: int, steps: int, saved: Optional[int], checkpoint: Optional[str]) -> None:
        super().__init__(f"stopped after step {done} of {steps}")
        self.done, self.steps, self.saved, self.checkpoint = done, steps, saved, checkpoint


def read_checkpoint(path: str, device: Any = "cpu") -> Dict[str, Any]:
    """A search checkpoint; ValueError for a file that is not one of this version's."""
    return ckpt.read(path, device=device, format=FORMAT, errors=(EOFError, RuntimeError, pickle.UnpicklingError),
                     unreadable="{path} cannot be read as a DiffRate search checkpoint ({message})",
                     not_one=f"{path} is not a DiffRate search checkpoint of this tome_plus (no {FORMAT!r} format "
                             "record); start a new search")


def search(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]], gflops: float,
           steps: int, granularity: int = 4, lr: float = 0.01, min_lr: float = 0.001, flops_weight: float = 5.0,
           distill: bool = False, checkpoint: Optional[str] = None, resume: bool = False, progress: bool = True,
           prop_attn: bool = True, straight_through: str = "authors", size_clamp: str = "per_source",
           train: bool = True, drop_path: Optional[float] = 0.1, mixup: Optional[Callable] = None,
           smoothing: float = 0.1, lr_schedule: str = "epoch", epoch_steps: Optional[int] = None,
           about: Optional[Dict[str, Any]] = None) -> Tuple[DiffRateRates, List[Dict[str, float]]]:
    """Search the rates of a timm ViT for `gflops` GMACs (multiply-accumulates, which DiffRate
    calls GFLOPs).

    `batches`: an iterable (cycled) of `(images, labels)`, augmented as the caller wants; labels
    may be None with `distill`. `straight_through`, `size_clamp`: the module doc ("authors" /
    "per_source" are the authors' search). `train`: run the backbone in train mode (drop-path,
    dropout as the model has them; the weights stay frozen); `drop_path`: the drop-path rate for
    the search (timm's linear rule over depth, installed for the search and removed afterwards;
    None: the model's own). `mixup`: a callable `(images, labels) -> (images, soft targets)`
    such as `timm.data.Mixup` (then timm's `SoftTargetCrossEntropy`; batches must hold at least
    2 images, an odd one loses its last); without it timm's `LabelSmoothingCrossEntropy(smoothing)`.
    `lr_schedule`: "epoch" (the authors' per-epoch cosine; an epoch is `epoch_steps` steps, by
    default `len(batches)`) or "step" (per-step cosine). `checkpoint`: the rates, optimizer, step
    and settings, written every 50 steps, at the end and on Ctrl-C (rank 0); `resume` continues
    from it (it must exist and hold these settings and `about`; to `steps`, the cosine re-planned
    over them; fewer steps than it holds is an error). Returns the rates and one record per step
    run (none when the checkpoint already holds `steps`). Ctrl-C raises `SearchInterrupted`.
    """
    from ..backends.base import get_info
    from ..backends.timm_vit import check as check_timm, matches

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_modes(straight_through, size_clamp)
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if not (lr > 0 and 0 <= min_lr <= lr):
        raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got {lr} and {min_lr}")
    if drop_path is not None and not 0 <= drop_path < 1:
        raise ValueError(f"drop_path must lie in [0, 1), got {drop_path}")
    if not matches(model):
        raise TypeError(f"the DiffRate search runs timm VisionTransformers, got {type(model).__name__}")
    check_timm(model)
    if get_info(model) is not None:
        raise ValueError("the model is patched: search on the unpatched model (tome_plus.unpatch(model))")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("DiffRate orders tokens by the class token's attention: the model has no class token")
    if lr_schedule == "epoch" and epoch_steps is None:
        try:
            epoch_steps = len(batches)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("lr_schedule='epoch' needs epoch_steps (the batches have no length)") from None
    if lr_schedule == "step":
        epoch_steps = None
    elif epoch_steps < 1:
        raise ValueError(f"epoch_steps must be >= 1, got {epoch_steps}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    modes = [(m, m.training) for m in model.modules()]
    paths = [(blk, blk.drop_path1, blk.drop_path2) for blk in model.blocks]
    try:
        for p in trainable:  # frozen for the search, handed back as they were
            p.requires_grad_(False)
        if drop_path is not None:
            from timm.layers import DropPath
            for blk, rate in zip(model.blocks, torch.linspace(0, drop_path, len(model.blocks)).tolist()):
                blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
                blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
        model.train(train)
        config = dict(granularity=granularity, lr=lr, min_lr=min_lr, flops_weight=flops_weight, distill=distill,
                      prop_attn=prop_attn, straight_through=straight_through, size_clamp=size_clamp, train=train,
                      drop_path=drop_path, mixup=describe_mixup(mixup), smoothing=smoothing,
                      lr_schedule=lr_schedule, epoch_steps=epoch_steps)
        return _search(model, batches, float(gflops), steps, config, checkpoint, resume, progress, mixup,
                       dict(about or {}))
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for blk, path1, path2 in paths:
            blk.drop_path1, blk.drop_path2 = path1, path2
        for m, mode in modes:
            m.training = mode


def _search(model, batches, gflops, steps, config, checkpoint, resume, progress, mixup, about):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    device = next(model.parameters()).device
    rates = DiffRateRates.for_model(model, config["granularity"]).to(device)
    settings = dict(config, gflops=gflops, n_tokens=rates.n_tokens, n_prefix=rates.n_prefix,
                    depth=len(model.blocks), fixed=list(rates.fixed), about=about)
    optimizer = torch.optim.AdamW(rates.parameters(), lr=config["lr"], weight_decay=0.0)
    rank = process_rank()
    start, last = 0, None
    if resume:
        if not checkpoint or not os.path.exists(checkpoint):
            raise FileNotFoundError(f"resume: there is no checkpoint {checkpoint!r} to continue")
        state = read_checkpoint(checkpoint, device)
        changed = ckpt.settings_changed(state["settings"], settings)
        if changed:
            raise ValueError(f"resume: {checkpoint} was searched with other settings ({'; '.join(changed)})")
        if state["step"] > steps:
            raise ValueError(f"resume: {checkpoint} holds step {state['step']}, more than steps={steps}")
        rates.load_state_dict(state["rates"])
        optimizer.load_state_dict(state["optimizer"])
        start, last = state["step"], state.get("last")
    # every rank must go on from the same step, or the gradient exchange deadlocks
    same_start(start, f"resume: the processes read different steps from {checkpoint} "
                      "({low} to {high}); it must be on a file system every process sees", device)
    broadcast_from_first(rates)  # every rank continues from rank 0's rates
    soft_loss, hard_loss = SoftTargetCrossEntropy(), LabelSmoothingCrossEntropy(config["smoothing"])
    modes = dict(prop_attn=config["prop_attn"], straight_through=config["straight_through"],
                 size_clamp=config["size_clamp"])

    def save(step: int) -> None:  # written whole and renamed: Ctrl-C mid-write leaves the last one as it was
        ckpt.write({"format": FORMAT, "rates": rates.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "settings": settings, "last": last}, checkpoint)

    history: List[Dict[str, float]] = []
    data = cycle(batches)
    done, saved, stepping = start, (start if resume else None), False
    try:
        for step in steps_bar(start, steps, "DiffRate search", progress and rank == 0):
            lr = learning_rate(step, steps, config["lr"], config["min_lr"], config["epoch_steps"])
            set_lr(optimizer, lr)
            images, labels = next(data)
            images = images.to(device)
            labels = labels.to(device) if labels is not None else None
            targets = None
            if mixup is not None:
                if len(images) < 2:
                    raise ValueError("mixup needs batches of at least 2 images")
                if len(images) % 2:  # timm's Mixup pairs the batch with its reverse
                    images, labels = images[:-1], labels[:-1] if labels is not None else None
                dummy = torch.zeros(len(images), dtype=torch.long, device=device)
                images, targets = mixup(images, labels if labels is not None else dummy)
            logits, pooled, macs = search_forward(model, images, rates, **modes)
            if config["distill"]:
                with torch.no_grad():
                    mode = [(m, m.training) for m in model.modules()]
                    model.eval()  # the target without drop-path
                    target = model.forward_head(model.forward_features(images), pre_logits=True)
                    for m, was in mode:
                        m.training = was
                task = (1 - F.cosine_similarity(pooled, target, dim=-1)).mean()
            elif labels is None:
                raise ValueError("labels are needed unless distill=True")
            elif mixup is not None:
                task = soft_loss(logits, targets)
            else:
                task = hard_loss(logits, labels) if config["smoothing"] > 0 else F.cross_entropy(logits, labels)
            loss = task + config["flops_weight"] * (macs - gflops) ** 2
            backward(loss, optimizer)
            stepping = True  # a Ctrl-C in here leaves no consistent state to save
            optimizer_step(optimizer, rates.parameters())
            done, stepping = step + 1, False
            last = {"step": step + 1, "loss": loss.item(), "task": task.item(), "gmacs": macs.item(), "lr": lr}
            history.append(last)
            if checkpoint and rank == 0 and due(step + 1, SAVE_EVERY, steps):
                save(step + 1)
                saved = step + 1
    except KeyboardInterrupt:
        if checkpoint and rank == 0 and not stepping and done != saved and done > 0:
            try:
                save(done)
                saved = done
            except (KeyboardInterrupt, OSError):
                pass
        raise SearchInterrupted(done, steps, saved, checkpoint) from None
    return rates, history


def save_schedule(rates: DiffRateRates, path: str, **about: Any) -> Dict[str, Any]:
    """Write the searched counts as JSON (`tome_plus.patch(model, "diffrate", schedule=path)`),
    atomically, with the `about` entries (the target, the model); returns what was written."""
    schedule = dict(rates.schedule(), **about)
    ckpt.write_json(schedule, path)
    return schedule


save = save_schedule  # the trainable part's `save(trained, path, **extra)`, as `tome_plus.atp.save`


def load(model: nn.Module, path: str) -> nn.Module:
    """Patch `model` with the schedule `save` wrote: `tome_plus.patch(model, "diffrate", schedule=path)`."""
    from ..api import patch
    return patch(model, "diffrate", schedule=path)
