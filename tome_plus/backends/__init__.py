"""Model families tome_plus can patch; each module is a `contract.Backend`.

The HF backends import transformers, so they are loaded only for models whose classes come from
it: patching a timm model never imports transformers.
"""
from . import timm_vit

HF_HINT = 'pip install "tome_plus[hf]"'


def _from_transformers(model) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def backends_for(model) -> list:
    found = [timm_vit]
    if _from_transformers(model):
        try:
            from . import hf_clip, hf_llava
        except ImportError as e:  # an older transformers without the classes we reimplement
            raise TypeError(f"tome_plus needs a newer transformers for {type(model).__name__} ({e}); "
                            f"{HF_HINT} installs a tested version") from e
        found += [hf_llava, hf_clip]
    return found


def find_backend(model):
    found = backends_for(model)
    for backend in found:
        if backend.matches(model):
            return backend
    families = "; ".join(b.FAMILY for b in found)
    if len(found) == 1:
        families += f"; HF CLIP/SigLIP towers and LLaVA (with transformers: {HF_HINT})"
    raise TypeError(f"tome_plus cannot patch {type(model).__name__}; supported model families: {families}")
