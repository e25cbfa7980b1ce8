"""`tome_plus.diffrate_search`: DiffRate's rate search (`search`, `save_schedule`, ...).

The code lives in `tome_plus.training.diffrate`; this name is the same module (see its doc)."""
import sys

from .training import diffrate as _diffrate

sys.modules[__name__] = _diffrate
