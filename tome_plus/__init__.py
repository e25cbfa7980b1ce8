"""tome_plus: token reduction for vision transformers, one line to patch a model."""
import importlib

from . import heads, vis
from .api import Inspection, inspect, methods, patch, refresh, unpatch

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "refresh", "methods", "inspect", "Inspection", "vis", "heads", "atp"]


def __getattr__(name: str):
    # `tome_plus.atp` (ATP training, save/load) needs transformers: loaded on first use only, so
    # the timm path never imports it
    if name == "atp":
        return importlib.import_module(".atp", __name__)
    raise AttributeError(f"module 'tome_plus' has no attribute {name!r}")
