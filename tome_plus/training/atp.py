"""ATP's trainable part: train the modules of a patched LLaVA, save and load just their weights.

    tome_plus.patch(llava, "atp", keep=0.25)
    history = tome_plus.atp.train(llava, batches, steps=1000, checkpoint="atp.pt")
    tome_plus.patch(other_llava, "atp", keep=0.25, weights="atp.pt")

Training runs the model with soft masks (nothing is removed; a module's mask enters every later
layer's attention as `log(m)` on the keys) and minimises the language-model loss plus
`budget_weight * (layer-averaged visual fraction kept - keep)^2`. Only the ATP modules train; the
LLM and the tower stay frozen unless `train_llm=True`. Under `torch.distributed` (e.g. `torchrun`,
gloo on CPU, NCCL on GPU) every rank starts from rank 0's modules and averages gradients, so the
modules stay identical across ranks.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ..backends.base import get_info
from ..llm.context import collecting
from ..methods.atp import follow, load_modules
from . import checkpoint as ckpt
from .distributed import broadcast_from_first, rank as process_rank
from .loop import backward, cycle, due, step as optimizer_step, steps_bar


def modules(model: nn.Module) -> nn.Module:
    """The ATP modules of a model patched with "atp"."""
    info = get_info(model)
    if info is None or info.method != "atp":
        raise ValueError('model is not patched with "atp"; call tome_plus.patch(model, "atp", ...) first')
    return info.modules


def save(model: nn.Module, path: str, **extra: Any) -> None:
    """Write the ATP modules' weights (and `extra` entries, e.g. the optimizer) to `path`."""
    mods = modules(model)
    ckpt.write({"modules": mods.state_dict(), "layers": list(mods.layers), **extra}, path)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint `train` wrote (the modules, their layers, optimizer and step)."""
    return ckpt.read(path, keys=("modules", "layers", "optimizer", "step"),
                     not_one=f"{path} is not a checkpoint of `tome-plus atp-train` (modules, layers, optimizer, step)")


def load(model: nn.Module, path: str) -> None:
    """Load weights `save` wrote; the modules' thresholds decide from then on."""
    load_modules(modules(model), path)


def forward_kept(model: nn.Module, batch: Dict[str, torch.Tensor]):
    """`model(**batch)` and the visual fraction its ATP modules kept (soft masks; the batch mean
    over the rows with an image). The one place training reads what the LLM backend collects."""
    with collecting() as collected:
        out = model(**batch)
    fractions = [s.kept_fraction for s in collected if s.kept_fraction is not None]
    if not fractions:
        raise ValueError("no batch reached an ATP module with image tokens: batches need pixel_values and "
                         "image placeholders")
    return out, torch.cat(fractions).nanmean()  # rows without an image have no fraction


def train(model: nn.Module, batches: Iterable[Dict[str, torch.Tensor]], steps: int, lr: float = 1e-3,
          weight_decay: float = 0.0, checkpoint: Optional[str] = None, save_every: int = 100,
          resume: bool = False, train_llm: bool = False, progress: bool = True) -> List[Dict[str, float]]:
    """Train the ATP modules of `model` for `steps` optimizer steps; returns one record per step.

    `batches`: an iterable (cycled) of model inputs with `labels` (`input_ids`, `attention_mask`,
    `pixel_values`, `labels`, as a LLaVA processor makes them; -100 where no loss). `checkpoint`:
    where to save the modules, the optimizer and the step every `save_every` steps and at the end;
    `resume=True` continues from it. The modules' thresholds decide at inference afterwards.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if train_llm and checkpoint is not None:
        raise ValueError("train_llm=True with a checkpoint: the checkpoint holds the ATP modules only, the trained "
                         "LLM would be lost; save the model yourself and pass checkpoint=None")
    info = get_info(model)
    mods = modules(model)
    config = info.config
    rank = process_rank()
    # the modules are not the model's parameters (`PatchInfo.modules`): on its device and dtype
    # now, before the optimizer and the broadcast see them
    follow(mods, model.get_input_embeddings().weight)
    frozen = [p for p in model.parameters() if p.requires_grad]
    if not train_llm:
        for p in frozen:
            p.requires_grad_(False)
    for p in mods.parameters():
        p.requires_grad_(True)
    params = list(mods.parameters()) + [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start = 0
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = read_checkpoint(checkpoint)
        if state.get("keep", config.keep) != config.keep:
            raise ValueError(f"{checkpoint} was trained for keep={state['keep']}, not keep={config.keep}; resume with "
                             f"its keep or start a new checkpoint")
        mods.load_state_dict(state["modules"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    broadcast_from_first(mods)  # every rank starts from rank 0's modules
    history: List[Dict[str, float]] = []
    data = cycle(batches)
    bar = steps_bar(start, steps, "ATP", progress and rank == 0)
    try:
        for step in bar:
            out, kept = forward_kept(model, next(data))
            budget = config.budget_weight * (kept - config.keep) ** 2
            loss = out.loss + budget
            backward(loss, optimizer)
            optimizer_step(optimizer, params)
            record = {"step": step + 1, "loss": loss.item(), "lm_loss": out.loss.item(), "budget_loss": budget.item(),
                      "kept": kept.item()}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kept=f"{record['kept']:.3f}")
            if checkpoint is not None and rank == 0 and due(step + 1, save_every, steps):
                mods.trained.fill_(True)
                # the keep target is recorded so that a resume for another target is refused
                save(model, checkpoint, optimizer=optimizer.state_dict(), step=step + 1, keep=config.keep)
    finally:
        if not train_llm:
            for p in frozen:
                p.requires_grad_(True)
    mods.trained.fill_(True)
    return history
