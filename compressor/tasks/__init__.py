"""Tasks: what depends on what a model predicts (compressor/tasks/base.py). One module per task, registered by name
as the recipe's `task:` names it: classification, detection, segmentation, language-modeling."""
from __future__ import annotations

from compressor.tasks.base import Evaluator, Task
from compressor.tasks.registry import TASKS
from compressor.tasks import classification  # noqa: F401  (registers)
from compressor.tasks import segmentation  # noqa: F401  (registers)
from compressor.tasks import detection  # noqa: F401  (registers)
from compressor.tasks import language_modeling  # noqa: F401  (registers)

__all__ = ["TASKS", "Task", "Evaluator", "build_task", "task_of_model"]


def build_task(name: str, num_classes: int, **options) -> Task:
    """The recipe's task, built for the model's classes."""
    return TASKS.get(name)(num_classes, **options)


def task_of_model(model, num_classes: int) -> Task:
    """The task a model's own attributes say it serves, where no recipe names one (`compressor export MODEL`): a
    detector wrapper names its output layout, a segmenter exports at any size, a causal LM predicts the next
    token; anything else classifies."""
    bare = getattr(model, "module", model)
    if getattr(bare, "causal_lm", False):  # compressor/models/hf_causal_lm.py: next-token logits
        return build_task("language-modeling", num_classes)
    if getattr(bare, "output_layout", None) is not None:
        return build_task("detection", getattr(bare, "num_classes", num_classes))
    if getattr(bare, "dynamic_size", False):
        return build_task("segmentation", num_classes)
    return build_task("classification", num_classes)
