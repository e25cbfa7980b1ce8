"""`tome_plus.atp`: ATP's trainable part (train, save, load the modules of a patched LLaVA).

The code lives in `tome_plus.training.atp`; this name is the same module (see its doc)."""
import sys

from .training import atp as _atp

sys.modules[__name__] = _atp
