"""Pruning methods (prune.method) and hosts (prune.host). Each module registers its classes in registry.METHODS /
registry.HOSTS; importing this package registers them all."""
from __future__ import annotations

from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.registry import HOSTS, METHODS
from compressor.prune.methods import dpm, fggp, hosts, ocsp  # noqa: F401  (register themselves)

METHODS.register("none")(PruningMethod)

__all__ = ["HOSTS", "METHODS", "PruningMethod"]
