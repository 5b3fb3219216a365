"""What a task decides, in one object per task (classification, detection, segmentation): see compressor/tasks.

A task owns everything that depends on what the model predicts: the loss training uses (the model's own where it
has one), the evaluation metrics and which of them is the *primary* number the gates and reports use, the layers
that must never be pruned (predictors, DFL, anchors), distillation between a dense teacher and the student, and how
an exported file's outputs are compared with PyTorch's. Everything else (pruning, slimming, export, bench) is the
same code for every task.

Conventions every task keeps, so the rest of compressor stays task-free:
- a model takes ONE input tensor (N, C, H, W) and in eval mode returns a tensor (or a tuple of tensors: the raw
  head outputs, the same tensors the ONNX export writes); wrappers in compressor/models make torchvision and
  Ultralytics models do so;
- a dataset yields (image tensor, target); its batches are collated by `dataset.collate` when the dataset has one
  (detection: `compressor.tasks.targets.BoxTargets`), else by torch's default; a batch's targets have
  `.to(device, non_blocking=...)` and `len()` (the number of images);
- an Evaluator is fed the eval-mode outputs (PyTorch's, or ONNX Runtime's as torch tensors) batch by batch, so the
  PyTorch model and every exported file are scored by the same code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
from torch import nn

Gather = Callable[[Any], list[Any]]  # one object per process in, every process's object out (DDP ranks)


def alone(obj: Any) -> list[Any]:
    """The gather of a single process."""
    return [obj]


class Evaluator(ABC):
    """Accumulates one evaluation: `update(outputs, targets)` per batch, then `compute(gather)` once."""

    @abstractmethod
    def update(self, outputs: Any, targets: Any) -> None:
        ...  # each subclass implements it

    @abstractmethod
    def compute(self, gather: Gather = alone) -> dict[str, float]:
        """The metrics (floats; "count": the images seen) over everything every process saw."""
        ...  # each subclass implements it


class Task(ABC):
    """The base of every task; subclasses register in compressor.tasks.TASKS."""

    name: ClassVar[str] = "task"
    primary: ClassVar[str] = "top1"  # the metrics key gates and reports use
    primary_label: ClassVar[str] = "top-1"  # how reports name it
    primary_unit: ClassVar[str] = "%"  # its unit; drops are in points of it
    # whether a larger primary metric is better (top-1, mAP, mIoU); False for a loss-like metric (perplexity), whose
    # "drop" from the dense model is compressed minus dense
    higher_is_better: ClassVar[bool] = True
    count_label: ClassVar[str] = "images"  # what the metrics' "count" counts (logs: "64 images of coco")
    columns: ClassVar[tuple[tuple[str, str, int], ...]] = ()  # the report's metric columns: (key, label, digits)
    # the least relative tolerance of export parity (times max |output|, added to verify.atol): a segmenter's
    # per-pixel logits and a detector's pixel boxes pass through many more float32 reductions and resamplings than
    # a classifier's logits, and ONNX Runtime's kernels round them differently in the last bits
    parity_rtol: ClassVar[float] = 0.0
    unit_images: ClassVar[bool] = False  # the task's models take images scaled to [0, 1] (random_inputs)

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    # ------------------------------------------------------------------------------------------ training
    @abstractmethod
    def criterion(self, outputs: Any, targets: Any, model: nn.Module) -> torch.Tensor:
        """The training loss of one batch from the train-mode outputs (`model`: the bare model, for models that
        own their loss): a scalar tensor."""
        ...  # each subclass implements it

    def loss(self, module: nn.Module, inputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The training loss of one batch: forward through `module` (the model, or its DDP wrapper, so gradients
        synchronise), then `criterion`."""
        return self.criterion(module(inputs), targets, getattr(module, "module", module))

    def teacher_outputs(self, teacher: nn.Module, inputs: torch.Tensor) -> Any:
        """A frozen dense teacher's outputs to distil from, in the structure the student's train-mode outputs
        have (no gradients)."""
        with torch.no_grad():
            return teacher(inputs)

    @abstractmethod
    def distill(self, student: Any, teacher: Any, temperature: float) -> torch.Tensor:
        """A distillation term between the student's train-mode outputs and `teacher_outputs`; scalar."""
        ...  # each subclass implements it

    # ------------------------------------------------------------------------------------------ evaluation
    @abstractmethod
    def evaluator(self, model: Optional[nn.Module] = None, metric: Optional[Callable[..., float]] = None) -> Evaluator:
        """A fresh evaluation. `model`: the model evaluated (a detector's output layout); `metric`: the Python
        API's metric(outputs, targets) -> float (classification)."""
        ...  # each subclass implements it

    def describe(self) -> dict[str, Any]:
        """What the report records of the task (report.json "task"; compressor/app/report.py reads it)."""
        return {"name": self.name, "primary": self.primary, "label": self.primary_label, "unit": self.primary_unit,
                "higher_is_better": self.higher_is_better, "columns": [list(c) for c in self.columns]}

    def summary(self, metrics: dict[str, float]) -> str:
        """One line of the primary metric (and what goes with it) for logs."""
        return f"{self.primary_label} {metrics[self.primary]:.2f}{self.primary_unit}"

    # ------------------------------------------------------------------------------------------ pruning
    def protected(self, model: nn.Module) -> list[str]:
        """Names of modules that must never be pruned (added to model.ignore); the last layer is always kept by
        the planner anyway."""
        return []

    # ------------------------------------------------------------------------------------------ export
    def random_inputs(self, model_cfg: Any, count: int) -> torch.Tensor:
        """Seeded random inputs where no data is given (`compressor export` without a recipe): a classifier's
        standard normal (compressor.models.loading.example_inputs); tasks whose models take [0, 1] images draw
        uniformly from that range, since their heads amplify out-of-range inputs into boxes of thousands of pixels."""
        from compressor.models.loading import example_inputs

        if self.unit_images:
            return torch.rand((count, *model_cfg.input_shape), generator=torch.Generator().manual_seed(0))
        return example_inputs(model_cfg, count)

    def rtol(self, recipe_rtol: float) -> float:
        """The relative parity tolerance: the recipe's verify.rtol, at least the task's parity_rtol."""
        return max(recipe_rtol, self.parity_rtol)

    def compare(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
        """The parity rule for an exported file's outputs against PyTorch's (compressor.deploy.verify.check judges
        the result): every output's differences, top-1 agreement over the class axis (axis 1) where there is one."""
        from compressor.deploy.verify import compare_all

        return compare_all(reference, candidate)

    def reduced_compare(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
        """The parity rule for a reduced-precision (int8 / fp16) file against the fp32 PyTorch outputs, judged with
        the precision's relative tolerance and top-1 agreement: the fp32 rule unless the task has a better one."""
        return self.compare(reference, candidate)


def as_tensors(outputs: Any) -> tuple[torch.Tensor, ...]:
    """A model's eval outputs as a tuple of tensors (one tensor -> a 1-tuple)."""
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    if isinstance(outputs, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in outputs):
        return tuple(outputs)
    raise TypeError(f"model outputs must be a tensor or a tuple of tensors, got {type(outputs).__name__}")

