"""KV-cache policies: what the language model keeps of its cache while it decodes
(`tome_plus.patch(model, ..., kv="a2sf", kv_options={...})`), independent of where visual tokens
are reduced. The engine (`engine.py`: the decoder, the scores, the pruned cache) is shared; a
policy is one file holding a `KvPolicy` subclass (its options and how it scores and ranks) named
`POLICY`, plus one line in `REGISTRY`."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, List, Optional, Type

# policy name -> its module in this package. Imported only when a patch asks for the policy (the
# engine needs transformers), so the names are known without it (`tome-plus bench --kv` lists them).
REGISTRY = {
    "a2sf": "a2sf",
}


def policy_names() -> List[str]:
    return sorted(REGISTRY)


def policy_class(name: str) -> Type:
    """The `KvPolicy` subclass registered as `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(policy_names())}")
    return importlib.import_module(f"{__name__}.{REGISTRY[name]}").POLICY


def make_config(name: str, options: Optional[Dict[str, Any]] = None):
    """The policy from `kv=name` and `kv_options` (unknown options: TypeError naming the valid ones)."""
    cls = policy_class(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise TypeError(f"unknown kv_options {unknown} for kv={name!r}; valid options: {valid}")
    return cls(**(options or {}))
