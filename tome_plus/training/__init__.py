"""Training, in one place: the shared pieces and every trainer of the package.

- `loop`: endless batches (`cycle`), the optimizer step with averaged gradients, the progress
  bar, when a checkpoint is due;
- `distributed`: `torchrun` jobs (`setup_distributed`, `teardown_distributed`), rank 0's weights
  to every rank (`broadcast_from_first`), averaged gradients and buffers, one start step;
- `checkpoint`: atomic writes (`write`, `write_json`), checked reads (`read`), resume settings
  (`settings_changed`): the one save/load convention of the trainable parts (module doc);
- `atp`: ATP's modules inside a LLaVA (`tome_plus.atp`: `train`, `save`, `load`, `modules`);
- `diffrate`: DiffRate's rate search (`tome_plus.diffrate_search`: `search`, `save_schedule`, ...).

The CLCA head's weights save and load with `tome_plus.heads.save/load`; the command-line trainers
(`tome-plus finetune`, `atp-train`, `diffrate-search`) are in `tome_plus.tools`. Nothing here
imports the tools; `atp` and `diffrate` load on first use (transformers, timm's training tools).
"""
import importlib

from .distributed import (average_buffers, average_gradients, broadcast_from_first, distributed_world,
                          same_start, setup_distributed, teardown_distributed)
from .loop import cycle

__all__ = ["cycle", "distributed_world", "broadcast_from_first", "average_gradients", "average_buffers",
           "same_start", "setup_distributed", "teardown_distributed", "loop", "distributed", "checkpoint",
           "atp", "diffrate"]


def __getattr__(name: str):
    if name in ("atp", "diffrate", "checkpoint", "loop", "distributed"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tome_plus.training' has no attribute {name!r}")
