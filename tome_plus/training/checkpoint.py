"""Checkpoints and saved weights, written and read one way for every trainer.

Convention (ATP's modules `tome_plus.atp.save/load`, the CLCA head `tome_plus.heads.save/load`,
DiffRate's schedule `tome_plus.diffrate_search.save_schedule`, the search and fine-tuning
checkpoints): `save(model, path, **extra)` writes one dict (torch) or JSON object, whole, to a
temporary file next to `path` and renames it over `path` (`write`, `write_json`), so a Ctrl-C or
a full disk mid-write leaves the previous file as it was; `extra` entries (an optimizer's state,
the step, the settings a resume must match) go into the same dict. `load(model, path)` reads it
back into the model's trainable part and refuses, naming the file, one that does not fit.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Collection, Dict, List, Optional, Tuple

import torch


def write(payload: Dict[str, Any], path: str) -> None:
    """`torch.save(payload)` to `path`, atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj: Dict[str, Any], path: str, indent: int = 1) -> None:
    """`obj` as JSON to `path`, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: str, not_one: str, format: Optional[str] = None, keys: Collection[str] = (),
         device: Any = "cpu", missing: bool = False,
         unreadable: str = "{path} could not be read ({error})",
         errors: Tuple[type, ...] = (Exception,)) -> Dict[str, Any]:
    """The dict a trainer's `write` put at `path`. ValueError `not_one` for a file that is no dict,
    lacks the `format` record or one of `keys`; ValueError `unreadable` (formatted with `path`,
    `error` = "Type: message" and `message`) when the reader raises one of `errors` (pickle and
    zip readers share no base error class). `missing`: no file is FileNotFoundError first."""
    if missing and not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except errors as e:
        raise ValueError(unreadable.format(path=path, error=f"{type(e).__name__}: {e}", message=e)) from None
    if (not isinstance(payload, dict) or (format is not None and payload.get("format") != format)
            or not set(keys) <= set(payload)):
        raise ValueError(not_one)
    return payload


def saved_step(path: str) -> Any:
    """The step a checkpoint holds, "?" when it cannot be read (for a message that must go out)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False).get("step", "?")
    except Exception:  # any reader's error: the line still goes out
        return "?"


def file_stamp(path: str) -> Optional[tuple]:
    """(inode, mtime, size) of `path`, None when there is none: tells a rewritten file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def settings_changed(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """`key: saved there, current here` for each setting that differs (floats within 1e-9; an
    "about" dict, the caller's own settings, compared key by key)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "about":
            out += settings_changed(a, b)
            continue
        same = (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(a, float) and isinstance(b, float) else a == b)
        if not same:
            out.append(f"{key}: {a!r} there, {b!r} here")
    return out


def shape_mismatches(saved: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> List[str]:
    """`key is (shape) there, (shape) here` for each tensor of `saved` whose shape differs from `own`'s."""
    return [f"{k} is {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in saved.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)]
