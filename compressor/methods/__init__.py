"""Pruning methods, registered by name (the recipe's prune.method)."""
from __future__ import annotations

from ..errors import RecipeError
from ..registry import Registry
from .base import PruningMethod

METHODS: Registry = Registry("pruning method", RecipeError)
METHODS.register("none")(PruningMethod)

from . import dpm, fggp, hosts, ocsp  # noqa: E402,F401  (registers oneshot, iterative, dpm, fggp, ocsp)

__all__ = ["METHODS", "PruningMethod"]
