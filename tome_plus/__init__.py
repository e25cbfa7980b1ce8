"""tome_plus: token reduction for vision transformers, one line to patch a model."""
import importlib

from . import heads
from .api import Inspection, inspect, methods, patch, refresh, unpatch

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "refresh", "methods", "inspect", "Inspection", "vis", "heads", "atp",
           "diffrate_search"]


def __getattr__(name: str):
    # `tome_plus.atp` (ATP training, save/load) needs transformers, `tome_plus.diffrate_search`
    # the training loop (timm when it runs) and `tome_plus.vis` PIL: loaded on first use only, so
    # `import tome_plus` loads neither timm, transformers nor PIL
    if name in ("atp", "diffrate_search", "vis"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tome_plus' has no attribute {name!r}")
