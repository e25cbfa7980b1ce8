"""DiffRate's search: learn per-block prune and merge counts for a FLOPs target (timm ViTs).

Chen et al., ICCV 2023; docs/methods.md, DiffRate search; the authors' code is github.com/OpenGVLab/DiffRate
(`main.py`, `DiffRate/ddp.py`). What a step computes (the rates, their straight-through masks,
the merge, `straight_through` and `size_clamp`, the FLOPs term) is `training.diffrate_forward`;
here is the search that trains the rates on it, its recipe and what it writes.

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
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import diffrate_forward
from .distributed import broadcast_from_first, rank as process_rank, same_start
from .loop import backward, cycle, due, set_lr, step as optimizer_step, steps_bar

LR_SCHEDULES = ("epoch", "step")
FORMAT = "tome_plus.diffrate_search/2"
SAVE_EVERY = 50  # steps between checkpoints


def full_gmacs(model: nn.Module) -> float:
    """The unpatched model's MACs per image (GMACs, what DiffRate calls GFLOPs), counted as the
    search counts them (`diffrate_forward.block_flops`)."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.proj
    macs = (n - model.num_prefix_tokens) * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * dim
    count = torch.tensor(float(n))
    macs += dim * model.num_classes + len(model.blocks) * diffrate_forward.block_flops(count, count, dim, hidden).item()
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
           about: Optional[Dict[str, Any]] = None) -> Tuple[diffrate_forward.DiffRateRates, List[Dict[str, float]]]:
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
    diffrate_forward.check_modes(straight_through, size_clamp)
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
    rates = diffrate_forward.DiffRateRates.for_model(model, config["granularity"]).to(device)
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
            logits, pooled, macs = diffrate_forward.search_forward(model, images, rates, **modes)
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


def save_schedule(rates: diffrate_forward.DiffRateRates, path: str, **about: Any) -> Dict[str, Any]:
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
