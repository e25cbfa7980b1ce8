"""tome_plus: token reduction for vision transformers, one line to patch a model."""
from . import vis
from .api import Inspection, inspect, methods, patch, refresh, unpatch

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "refresh", "methods", "inspect", "Inspection", "vis"]
