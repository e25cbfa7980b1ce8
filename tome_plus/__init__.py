"""tome_plus: token reduction for vision transformers, one line to patch a model."""
import importlib
import os
import sys

try:
    from . import heads
    from .api import Inspection, inspect, methods, patch, refresh, unpatch
except KeyboardInterrupt:
    # Ctrl-C while torch loads, under the `tome-plus` command (whose console script imports this
    # package before any of its code runs): one line and 130, as at every later moment of a tool
    if os.path.basename(sys.argv[0]) != "tome-plus":
        raise
    print("tome-plus: interrupted: stopped before it started", file=sys.stderr, flush=True)
    raise SystemExit(130) from None

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
