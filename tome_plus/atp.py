"""`tome_plus.atp`: ATP's trainable part (train, save, load the modules of a patched LLaVA).

The code lives in `tome_plus.training.atp` (see its doc); this module names its public functions
under the short path. It imports transformers (the LLaVA backend), so `import tome_plus` loads it
on first use only.
"""
from .training.atp import load, modules, read_checkpoint, save, train

__all__ = ["train", "save", "load", "modules", "read_checkpoint"]
