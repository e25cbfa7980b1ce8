"""`tome_plus.diffrate_search`: DiffRate's rate search (`search`, `save_schedule`, ...).

The code lives in `tome_plus.training.diffrate` (the search) and `tome_plus.training.diffrate_forward`
(the forward it trains the rates on; see their docs); this module names their public functions
under the short path. `import tome_plus` loads it on first use only.
"""
from .training.diffrate import (LR_SCHEDULES, SearchInterrupted, full_gmacs, learning_rate, load, read_checkpoint,
                                save, save_schedule, search)
from .training.diffrate_forward import SIZE_CLAMPS, STRAIGHT_THROUGH, DiffRateRates, search_forward

__all__ = ["search", "save_schedule", "save", "load", "read_checkpoint", "SearchInterrupted", "DiffRateRates",
           "search_forward", "full_gmacs", "learning_rate", "STRAIGHT_THROUGH", "SIZE_CLAMPS", "LR_SCHEDULES"]
