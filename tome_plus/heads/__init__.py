"""Heads that replace a patched classifier's own head: `patch(model, method, head="clca")`.

    tome_plus.patch(vit, "tome", r=8, head="clca", head_options={"num_classes": 10})
    tome_plus.heads.save(vit, "clca.pt")          # the head's weights alone
    tome_plus.patch(other_vit, "tome", r=8, head="clca", head_options={"weights": "clca.pt"})

A head is an `nn.Module` registered on the patched model as `model.tome_plus_head` (in its
`state_dict`, moved by `.to()`, trained with the model) until `unpatch` removes it.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .. import registry
from ..backends.base import get_info
from .clca import ClcaConfig, ClcaHead  # noqa: F401  (ClcaConfig: the options `head_options` takes)

ATTR = "tome_plus_head"
# every head, one line each: a class with `config_class` (its options) and `build(model, config,
# reducing, depth)`
REGISTRY: registry.Registry[type] = registry.Registry("head", options="head_options",
                                                       config=lambda head: head.config_class)
REGISTRY.register("clca", ClcaHead)

head_names = REGISTRY.names
make_config = REGISTRY.config  # a head's options as `patch(head_options=...)` checks them


def name_of(model: nn.Module) -> Optional[str]:
    """The name of the head a patched model carries, or None."""
    info = get_info(model)
    return info.head_name if info is not None else None


def module(model: nn.Module) -> ClcaHead:
    """The head of a model patched with `head=...`."""
    info = get_info(model)
    if info is None or info.head is None:
        raise ValueError("model has no tome_plus head; patch it with head='clca'")
    return info.head


def save(model: nn.Module, path: str, **extra: Any) -> None:
    """Write the head's weights and its shape (and `extra` entries) to `path`, atomically (the
    save/load convention of every trainable part: `tome_plus.training.checkpoint`)."""
    from ..training import checkpoint  # the training side's writer, loaded only when a head is saved

    head = module(model)
    checkpoint.write({"head": get_info(model).head_name, "state_dict": head.state_dict(),
                      "append_at": list(head.append_at), "collect_at": list(head.collect_at),
                      "options": behaviour(head), **extra}, path)


def load(model: nn.Module, path: str) -> None:
    """Load weights `save` wrote into the head of `model` (same layers, width and classes)."""
    load_into(module(model), get_info(model).head_name, path)


def behaviour(head: nn.Module) -> Dict[str, Any]:
    """The options that change what a head computes without changing its shapes."""
    return {"cache": head.carrier is not None, "cache_gap": head.cache_gap, "protect_cached": head.protect_cached}


def load_into(head: nn.Module, name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"head weights {path!r} do not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("head") != name:
        raise ValueError(f"{path} holds a {payload.get('head')!r} head, not {name!r}")
    for key in ("append_at", "collect_at"):
        if tuple(payload[key]) != tuple(getattr(head, key)):
            raise ValueError(f"{path} was trained with {key}={payload[key]}, this patch has "
                             f"{list(getattr(head, key))}: give head_options={{'layers': ...}} to match")
    if payload.get("options", behaviour(head)) != behaviour(head):
        raise ValueError(f"{path} was trained with {payload['options']}, this head has {behaviour(head)}")
    own = head.state_dict()
    shapes = [f"{k}: {tuple(v.shape)} there, {tuple(own[k].shape)} here"
              for k, v in payload["state_dict"].items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"{path} does not fit this head ({shapes[0]})")
    head.load_state_dict(payload["state_dict"])
