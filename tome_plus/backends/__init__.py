"""Model families tome_plus can patch; each module offers `matches`, `patch` and `FAMILY`."""
from . import timm_vit

BACKENDS = [timm_vit]


def find_backend(model):
    for backend in BACKENDS:
        if backend.matches(model):
            return backend
    families = "; ".join(b.FAMILY for b in BACKENDS)
    raise TypeError(f"tome_plus cannot patch {type(model).__name__}; supported model families: {families}")
