"""Pruning methods (prune.method) and hosts (prune.host). Every module of this package is imported here, and each
registers its classes in registry.METHODS / registry.HOSTS: a new method or host is one new module."""
from __future__ import annotations

import importlib
import pkgutil

from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.registry import HOSTS, METHODS

METHODS.register("none")(PruningMethod)
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["HOSTS", "METHODS", "PruningMethod"]
