"""The backend contract: every registered backend answers every member of `contract.Backend`."""
import types

import pytest
import torch.nn as nn

import tome_plus
from tome_plus.backends import REGISTRY, contract, find_backend
from tome_plus.methods import get_method, method_names


def registered():
    """The registered backend modules whose package is installed."""
    modules = []
    for entry in REGISTRY:
        if entry.package is not None:
            pytest.importorskip(entry.package)
        modules.append(REGISTRY.get(entry.name))
    return modules


def test_contract_names_capabilities_and_functions():
    assert {"KIND", "FAMILY", "HEADS", "LLM_METHODS", "matches", "depth", "default_tokens", "prepare",
            "model_name", "check_budget", "install", "last_forward"} <= set(contract.members())


@pytest.mark.parametrize("entry", list(REGISTRY), ids=[entry.name for entry in REGISTRY])
def test_every_registered_backend_satisfies_the_contract(entry):
    name = entry.name
    if entry.package is not None:
        pytest.importorskip(entry.package)
    backend = REGISTRY.get(name)
    assert contract.missing(backend) == [], f"{name} lacks {contract.missing(backend)}"
    assert isinstance(backend.KIND, str) and isinstance(backend.FAMILY, str)
    assert isinstance(backend.HEADS, bool) and isinstance(backend.LLM_METHODS, bool)
    for member in contract.members():
        if callable(getattr(contract.Backend, member, None)):
            assert callable(getattr(backend, member)), f"{name}.{member} is not a function"


def test_missing_names_what_a_backend_lacks():
    partial = types.SimpleNamespace(KIND="x", FAMILY="y", matches=lambda model: False)
    assert "HEADS" in contract.missing(partial) and "install" in contract.missing(partial)
    assert "KIND" not in contract.missing(partial)


def test_every_method_names_its_target():
    assert all(get_method(name).target in ("vision", "llm") for name in method_names())


def test_unmatched_model_lists_every_family():
    with pytest.raises(TypeError, match="supported model families: timm VisionTransformer .*HF CLIP/SigLIP"):
        find_backend(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="supported model families"):
        tome_plus.patch(nn.Linear(2, 2), "tome", r=1)
