"""One registration idiom (docs/design.md, "Registration"): methods, heads, KV policies and backends
are each a `tome_plus.registry.Registry`; unknown names and options fail the same way for all of
them, and an entry registered by import path is imported only when asked for."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

import tome_plus
from tome_plus import backends, heads, kv
from tome_plus.methods import REGISTRY as METHODS, method_names  # (`tome_plus.methods` is the function)
from tome_plus.registry import Registry

# each kind: its registry, one registered name, and whether its entries take options
KINDS = {"method": (METHODS, "tome", True), "head": (heads.REGISTRY, "clca", True),
         "KV policy": (kv.REGISTRY, "a2sf", True), "backend": (backends.REGISTRY, "timm_vit", False)}


def test_every_registry_is_a_registry_and_the_public_names_read_it():
    for kind, (registry, name, _) in KINDS.items():
        assert isinstance(registry, Registry) and registry.kind == kind and name in registry.names()
    assert tome_plus.methods() == method_names() == METHODS.names()
    assert heads.head_names() == heads.REGISTRY.names() and kv.policy_names() == kv.REGISTRY.names()
    assert [entry.name for entry in backends.REGISTRY][0] == "timm_vit"  # tried in registration order


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_names_fail_alike(kind):
    registry = KINDS[kind][0]
    names = re.escape(", ".join(registry.names()))
    with pytest.raises(ValueError, match=rf"^unknown {kind} 'nope'; registered: {names}$"):
        registry.get("nope")


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_options_fail_alike(kind):
    registry, name, takes_options = KINDS[kind]
    if kind == "KV policy":
        pytest.importorskip("transformers")  # the policy's module holds its options
    if not takes_options:
        with pytest.raises(TypeError, match=f"^a {kind} takes no options$"):
            registry.check_options(name, {"nope": 1})
        return
    message = rf"^unknown {re.escape(registry.options)} \['nope'\] for {kind} '{name}'; valid options: \["
    with pytest.raises(TypeError, match=message):
        registry.config(name, {"nope": 1})


def test_patch_refuses_through_the_registries():
    """`patch` names an unknown method, head or KV policy, and an unknown option of each, before it
    looks at the model."""
    model = nn.Linear(2, 2)
    for call, error, message in (
            (dict(method="nope"), ValueError, "unknown method 'nope'"),
            (dict(method="tome", nope=1), TypeError, r"unknown option\(s\) \['nope'\] for method 'tome'"),
            (dict(method="tome", head="nope"), ValueError, "unknown head 'nope'"),
            (dict(method="tome", head="clca", head_options={"nope": 1}), TypeError,
             r"unknown head_options \['nope'\] for head 'clca'"),
            (dict(kv="nope"), ValueError, "unknown KV policy 'nope'")):
        with pytest.raises(error, match=message):
            tome_plus.patch(model, **call)


def test_register_once_as_a_call_or_a_decorator():
    registry = Registry("widget")

    @registry.register("a")
    class A:
        pass

    assert registry.register("b", "json:dumps") == "json:dumps" and registry.get("a") is A
    with pytest.raises(ValueError, match="widget 'a' is registered already"):
        registry.register("a", object())
    registry.unregister("a")
    assert registry.names() == ["b"]


def test_a_lazy_entry_is_imported_when_asked_for(tmp_path, monkeypatch):
    (tmp_path / "lazy_entry_probe.py").write_text("from dataclasses import dataclass\n\n"
                                                  "@dataclass\nclass Options:\n    size: int = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_entry_probe", raising=False)
    registry = Registry("widget", config=lambda cls: cls)
    registry.register("probe", "lazy_entry_probe:Options")
    assert registry.names() == ["probe"] and "probe" in registry and [e.name for e in registry] == ["probe"]
    assert "lazy_entry_probe" not in sys.modules
    assert registry.config("probe", {"size": 3}).size == 3
    assert "lazy_entry_probe" in sys.modules


def test_the_package_registries_import_nothing_to_list_their_names():
    """Listing every registry's names loads no model library and none of the lazy entries."""
    code = ("import sys, tome_plus; from tome_plus import backends, heads, kv\n"
            "from tome_plus.methods import REGISTRY\n"
            "regs = (REGISTRY, heads.REGISTRY, kv.REGISTRY, backends.REGISTRY)\n"
            "names = [r.names() for r in regs] + [[e.name for e in r] for r in regs]\n"
            "lazy = [e.target.partition(':')[0] for r in regs for e in r if isinstance(e.target, str)]\n"
            "assert lazy, 'no lazy entries'\n"
            "print(sorted(m for m in ['timm', 'transformers', *lazy] if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:] + out.stdout


def test_the_registry_is_core():
    """`tome_plus.registry` sits in the core layer: it imports nothing from tome_plus."""
    tree = ast.parse((Path(tome_plus.__file__).parent / "registry.py").read_text())
    imported = ["." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("tome_plus", "."))], imported
