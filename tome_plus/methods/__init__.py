"""Token-reduction methods; importing a method's module registers it (`@register`)."""
from . import atp, diffrate, divprune, fastv, pitome, pyramiddrop, sparsevlm, tome, visionzip, zero_tprune  # noqa: F401
from .base import REGISTRY, ReductionConfig, Reducer, get_method, method_names, register

__all__ = ["REGISTRY", "ReductionConfig", "Reducer", "get_method", "method_names", "register"]
