"""KV-cache policies: what the language model keeps of its cache while it decodes
(`tome_plus.patch(model, ..., kv="a2sf", kv_options={...})`), independent of where visual tokens
are reduced. The engine (`engine.py`: the decoder, the scores, the pruned cache) is shared; a
policy is one file holding a `KvPolicy` subclass (its options and how it scores and ranks) named
`POLICY`, plus one line in `REGISTRY`."""
from __future__ import annotations

from .. import registry

# every policy, one line each: a `KvPolicy` subclass, its own config. Registered by import path and
# imported only when a patch asks for it (the engine needs transformers), so the names are known
# without it (`tome-plus bench --kv` lists them).
REGISTRY: registry.Registry[type] = registry.Registry("KV policy", options="kv_options", config=lambda policy: policy)
REGISTRY.register("a2sf", "tome_plus.kv.a2sf:POLICY", package="transformers")
REGISTRY.register("snapkv", "tome_plus.kv.snapkv:POLICY", package="transformers")

policy_names = REGISTRY.names
policy_class = REGISTRY.get  # the `KvPolicy` subclass registered as a name (imported now)
make_config = REGISTRY.config  # the policy from `kv=name` and `kv_options`
