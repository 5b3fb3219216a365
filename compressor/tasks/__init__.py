"""Tasks: what depends on what a model predicts (compressor/tasks/base.py). One module per task, registered by name
as the recipe's `task:` names it: classification, detection, segmentation."""
from __future__ import annotations

from compressor.tasks.base import Evaluator, Task
from compressor.tasks.registry import TASKS
from compressor.tasks import classification  # noqa: F401  (registers)
from compressor.tasks import segmentation  # noqa: F401  (registers)
from compressor.tasks import detection  # noqa: F401  (registers)

__all__ = ["TASKS", "Task", "Evaluator", "build_task"]


def build_task(name: str, num_classes: int, **options) -> Task:
    """The recipe's task, built for the model's classes."""
    return TASKS.get(name)(num_classes, **options)
