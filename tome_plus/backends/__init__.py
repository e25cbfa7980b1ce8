"""Model families tome_plus can patch; each module is a `contract.Backend`.

`REGISTRY` holds them, one line each: the module's import path and the package its models' classes
come from. A module is imported only for a model with a class from that package in its MRO (None:
every model), so patching a timm model never imports transformers. They are tried in order; the
first that `matches` patches the model.
"""
import importlib
from types import ModuleType

from .. import registry

REGISTRY: registry.Registry[ModuleType] = registry.Registry("backend")
REGISTRY.register("timm_vit", "tome_plus.backends.timm_vit")
REGISTRY.register("hf_llava", "tome_plus.backends.hf_llava", package="transformers")
REGISTRY.register("hf_clip", "tome_plus.backends.hf_clip", package="transformers")
REGISTRY.register("hf_causal_lm", "tome_plus.backends.hf_causal_lm", package="transformers")

HF_HINT = 'pip install "tome_plus[hf]"'
# what a package's backends patch and how to install it, for the error naming what is supported
# while those backends are not loaded (the model's classes do not come from the package)
UNLOADED = {"transformers": (f"HF CLIP/SigLIP towers and LLaVA (with transformers: {HF_HINT})", HF_HINT)}


def _from_package(model, package: str) -> bool:
    return any(c.__module__.startswith(package + ".") for c in type(model).__mro__)


def _load(entry: registry.Entry, model):
    try:
        return REGISTRY.get(entry.name)
    except ImportError as e:  # e.g. an older transformers without the classes we reimplement
        package = entry.package
        hint = UNLOADED[package][1] if package in UNLOADED else f"pip install {package}"
        raise TypeError(f"tome_plus needs a newer {package} for {type(model).__name__} ({e}); "
                        f"{hint} installs a tested version") from e


def backends_for(model) -> list:
    """The registered backends that may patch `model` (imported now), in order."""
    return [_load(entry, model) for entry in REGISTRY
            if entry.package is None or _from_package(model, entry.package)]


def backend_of(info):
    """The backend that made the patch record `info` (`PatchInfo.backend`)."""
    return importlib.import_module(info.backend)


def find_backend(model):
    found = backends_for(model)
    for backend in found:
        if backend.matches(model):
            return backend
    families = [b.FAMILY for b in found]
    unloaded = (e.package for e in REGISTRY if e.package is not None and not _from_package(model, e.package))
    for package in dict.fromkeys(unloaded):
        families.append(UNLOADED[package][0] if package in UNLOADED else f"the {package} backends")
    raise TypeError(f"tome_plus cannot patch {type(model).__name__}; supported model families: "
                    f"{'; '.join(families)}")
