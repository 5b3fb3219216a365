"""The task registry (recipe `task:`), filled by the task modules as compressor.tasks imports them."""
from __future__ import annotations

from compressor.errors import RecipeError
from compressor.registry import Registry

TASKS: Registry = Registry("task", RecipeError)
