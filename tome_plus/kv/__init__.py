"""KV-cache policies: what the language model keeps of its cache while it decodes
(`tome_plus.patch(model, ..., kv="a2sf", kv_options={...})`), independent of where visual tokens
are reduced. One file per policy: `a2sf.py` (A2SF, with H2O's accumulation and a recent window as
its `scoring` variants)."""
from __future__ import annotations

from typing import Any, Dict, Optional

POLICIES = ("a2sf",)


def make_config(name: str, options: Optional[Dict[str, Any]] = None):
    """The policy's config from `kv=name` and `kv_options` (unknown options: TypeError naming the valid ones)."""
    import dataclasses
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(POLICIES)}")
    from .a2sf import A2sfConfig
    valid = [f.name for f in dataclasses.fields(A2sfConfig)]
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise TypeError(f"unknown kv_options {unknown} for kv={name!r}; valid options: {valid}")
    return A2sfConfig(**(options or {}))
