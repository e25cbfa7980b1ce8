"""DiffRate's search: learn per-block prune and merge counts for a FLOPs target (timm ViTs).

Chen et al., ICCV 2023; METHODS.md section 4. For each block and each of prune / merge, logits
theta over the candidate kept counts {N, N - g, N - 2g, ...} (g the granularity), zero-initialised;
pi = softmax(theta), expected count k = sum_c pi_c c, rounded up with a straight-through ceil.
Tokens stay in the tensor (static shapes): each block sorts them by the class token's attention
(averaged over heads), and the keep-probability of sorted rank i, P_i = sum_{c > i} pi_c, makes
the straight-through mask m = hard - stopgrad(P) + P (hard in the forward, P's gradient in the
backward). A pruned token leaves attention (its key gets log m); a merged token also hands
its state to its most similar kept token (hidden-state cosine), weighted by how much of it is
merged away (our reading of the masked merge; the authors' search code is not copied here).
FLOPs are analytic per block (attention with the incoming count, MLP with the outgoing one, each
block's own count, not its running minimum, so every block feels the FLOPs term), so the loss
`task + lambda (GFLOPs - target)^2` (lambda = 5) reaches theta through the counts too.
Only theta trains (AdamW, lr 0.01 with a cosine decay to 0.001, no weight decay); the backbone is
frozen and keeps no gradients. Under `torch.distributed` (torchrun; gloo on CPU, NCCL on GPU) the
rate gradients are averaged, so every rank holds the same rates.

The task loss: cross-entropy with labels for the model's own classes; for a backbone without them
(e.g. the DINOv2 backbone of `tome-plus fidelity`), `distill=True` uses 1 - cosine between the
searched and the unpatched model's pooled features instead: it asks the reduced model to keep the
unpatched features, which is what the fidelity check measures, and needs no labels or head to
train (a linear probe would tie the schedule to the probe's classes).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .training import average_gradients, broadcast_from_first, cycle, distributed_world


class DiffRateRates(nn.Module):
    """Learnable prune and merge logits of every block over the candidate kept counts."""

    def __init__(self, depth: int, n_tokens: int, n_prefix: int, granularity: int = 4) -> None:
        super().__init__()
        self.n_tokens, self.n_prefix = n_tokens, n_prefix
        counts = list(range(n_tokens, n_prefix, -granularity))
        self.register_buffer("candidates", torch.tensor(counts, dtype=torch.float32))
        self.prune = nn.Parameter(torch.zeros(depth, len(counts)))
        self.merge = nn.Parameter(torch.zeros(depth, len(counts)))

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        """Straight-through ceil of the expected count (a float tensor carrying pi's gradient)."""
        k = (logits.softmax(-1) * self.candidates).sum(-1)
        return k + (k.ceil() - k).detach()

    def mask(self, logits: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(`[n]` straight-through keep mask over sorted ranks, count) of one block's logits."""
        pi = logits.softmax(-1)
        count = self.expected(logits)
        ranks = torch.arange(n, device=logits.device, dtype=torch.float32)
        prob = (pi.unsqueeze(0) * (self.candidates.unsqueeze(0) > ranks.unsqueeze(1))).sum(-1)
        hard = (ranks < count.detach()).float()
        return hard - prob.detach() + prob, count

    def schedule(self) -> Dict[str, List[int]]:
        """The searched counts as DiffRate's JSON keys (running minima, class token included)."""
        prune, merge, n = [self.n_tokens], [self.n_tokens], self.n_tokens  # block 0 keeps every token
        with torch.no_grad():
            for lp, lm in zip(self.prune[1:], self.merge[1:]):
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
    """min(a, b, cap) in the forward; the full gradient to both a and b in the backward (as the
    authors' search does): a plain minimum would starve the larger one, and a running minimum
    every later block, of the FLOPs gradient."""
    value = torch.minimum(torch.minimum(a, b), cap).detach()
    return value + (a - a.detach()) + (b - b.detach())


def search_forward(model: nn.Module, images: torch.Tensor, rates: DiffRateRates, prop_attn: bool = True
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ViT run with the rates' masks: (logits, pooled features after `fc_norm`, GMACs).

    It computes what `tome_plus.patch(model, "diffrate", ...)` runs at inference, with masks in
    place of removal: sizes grow by each merged source's size times its similarity (clamped at 1,
    as the authors' search does) and enter attention as `log(size)` (`prop_attn`); average pooling
    weighs the live tokens by size.
    """
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    batch, n, dim = x.shape
    p = rates.n_prefix
    alive = x.new_ones(batch, n)  # product of the masks so far (hard forward, soft backward)
    size = x.new_ones(batch, n)
    hidden = model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.proj
    macs = (n - p) * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * dim + dim * model.num_classes
    count_in = x.new_tensor(float(n))
    for layer, blk in enumerate(model.blocks):
        attn = blk.attn
        h = blk.norm1(x)
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn:
            logits = logits + size.log()[:, None, None, :]
        probs = policy_softmax(logits, alive)
        x = x + blk.drop_path1(blk.ls1(attn.proj((probs @ v).transpose(1, 2).reshape(batch, n, -1))))
        if layer == 0:  # the first block keeps every token, as in the authors' search
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            macs = macs + block_flops(count_in, count_in, dim, hidden)
            continue
        importance = (probs[:, :, 0].mean(1) * alive).detach()
        importance[:, :p] = math.inf
        order = importance.argsort(dim=1, descending=True, stable=True)
        m_prune, k_p = rates.mask(rates.prune[layer], n)
        m_merge, k_m = rates.mask(rates.merge[layer], n)
        by_token = lambda m: torch.empty_like(alive).scatter_(1, order, m.expand(batch, -1).to(alive.dtype))
        keep_p, keep_m = by_token(m_prune), by_token(m_merge)
        # merged away: kept by the prune, dropped by the merge; into the most similar token the merge keeps
        moving = alive * keep_p * (1 - keep_m)
        with torch.no_grad():
            unit = F.normalize(x, dim=-1)
            sim = unit @ unit.transpose(1, 2)
            allowed = (keep_m.detach() * alive.detach() > 0.5)
            allowed[:, :p] = False
            sim = sim.masked_fill(~allowed.unsqueeze(1), -math.inf)
            best, dst = sim.max(dim=-1)
        received = torch.zeros_like(x).scatter_add(1, dst.unsqueeze(-1).expand_as(x), moving.unsqueeze(-1) * x)
        weight = torch.zeros_like(alive).scatter_add(1, dst, moving)
        x = (x + received) / (1 + weight).unsqueeze(-1)
        gained = torch.zeros_like(size).scatter_add(1, dst, moving * best.clamp(min=0).nan_to_num(0.0) * size)
        size = (size + gained).clamp(min=1)
        alive = alive * keep_p * keep_m
        count_out = ste_min(k_p, k_m, count_in)
        macs = macs + block_flops(count_in, count_out, dim, hidden)
        count_in = count_out
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = model.norm(x)
    if getattr(model, "global_pool", "token") == "avg":
        weights = (alive * size)[:, p:, None]
        pooled = (x[:, p:] * weights).sum(1) / weights.sum(1).clamp(min=1e-6)
    else:
        pooled = model.pool(x)
    pooled = model.fc_norm(pooled)
    return model.head(pooled), pooled, macs / 1e9


def full_gmacs(model: nn.Module) -> float:
    """The unpatched model's MACs per image (GMACs, DiffRate's unit), by the same analytic count."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    rates = DiffRateRates(len(model.blocks), n, model.num_prefix_tokens)
    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.proj
    macs = (n - model.num_prefix_tokens) * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * dim
    macs += dim * model.num_classes + len(model.blocks) * block_flops(torch.tensor(float(n)), torch.tensor(float(n)),
                                                                      dim, hidden).item()
    del rates
    return macs / 1e9


def search(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]], gflops: float,
           steps: int, granularity: int = 4, lr: float = 0.01, min_lr: float = 0.001, flops_weight: float = 5.0,
           distill: bool = False, checkpoint: Optional[str] = None, resume: bool = False, progress: bool = True,
           prop_attn: bool = True) -> Tuple[DiffRateRates, List[Dict[str, float]]]:
    """Search the rates of a timm ViT for `gflops` (GMACs, as DiffRate reports them).

    `batches`: an iterable (cycled) of `(images, labels)`; labels may be None with `distill`.
    `checkpoint`: the rates, optimizer, scheduler and step, written every 50 steps and at the end
    (rank 0); `resume` continues from it (to `steps`, the cosine stretched to them). `prop_attn`:
    as the schedule will run (the inference default). Returns the rates and one record per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("DiffRate orders tokens by the class token's attention: the model has no class token")
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # frozen for the search, handed back as they were
        p.requires_grad_(False)
    try:
        return _search(model, batches, gflops, steps, granularity, lr, min_lr, flops_weight, distill, checkpoint,
                       resume, progress, prop_attn)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _search(model, batches, gflops, steps, granularity, lr, min_lr, flops_weight, distill, checkpoint, resume,
            progress, prop_attn):
    device = next(model.parameters()).device
    n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    rates = DiffRateRates(len(model.blocks), n_tokens, model.num_prefix_tokens, granularity).to(device)
    optimizer = torch.optim.AdamW(rates.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=min_lr)
    rank = dist.get_rank() if distributed_world() > 1 else 0
    start = 0
    if resume and checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        rates.load_state_dict(state["rates"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.T_max = steps  # a resumed run may go further than the first one planned
        start = state["step"]
    broadcast_from_first(rates)  # every rank continues from rank 0's rates
    history: List[Dict[str, float]] = []
    data = cycle(batches)
    for step in tqdm(range(start, steps), disable=not progress or rank != 0, desc="DiffRate search", unit="step"):
        images, labels = next(data)
        images = images.to(device)
        logits, pooled, macs = search_forward(model, images, rates, prop_attn)
        if distill:
            with torch.no_grad():
                target = model.forward_head(model.forward_features(images), pre_logits=True)
            task = (1 - F.cosine_similarity(pooled, target, dim=-1)).mean()
        else:
            if labels is None:
                raise ValueError("labels are needed unless distill=True")
            task = F.cross_entropy(logits, labels.to(device))
        loss = task + flops_weight * (macs - gflops) ** 2
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        average_gradients(rates.parameters())
        optimizer.step()
        scheduler.step()
        history.append({"step": step + 1, "loss": loss.item(), "task": task.item(), "gflops": macs.item()})
        if checkpoint and rank == 0 and ((step + 1) % 50 == 0 or step + 1 == steps):
            save_checkpoint(checkpoint, rates, optimizer, scheduler, step + 1)
    return rates, history


def save_checkpoint(path: str, rates: DiffRateRates, optimizer, scheduler, step: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"rates": rates.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def save_schedule(rates: DiffRateRates, path: str, **about: Any) -> Dict[str, List[int]]:
    """Write the searched counts as JSON (`tome_plus.patch(model, "diffrate", schedule=path)`)."""
    schedule = dict(rates.schedule(), **about)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(schedule, f, indent=1)
    os.replace(tmp, path)
    return schedule
