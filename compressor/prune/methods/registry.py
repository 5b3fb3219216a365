"""The method and host registries: the recipe's prune.method and prune.host accept exactly the names registered
here, and a registered class that takes settings names its recipe sub-section in `config_section`."""
from __future__ import annotations

from compressor.errors import RecipeError
from compressor.registry import Registry

METHODS: Registry = Registry("pruning method", RecipeError)
HOSTS: Registry = Registry("host", RecipeError)
