"""Classification: (N, classes) logits, cross-entropy (label smoothing), top-1 / top-5, KL distillation."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from compressor.tasks.base import Evaluator, Gather, Task, alone
from compressor.tasks.registry import TASKS


class ClassificationEvaluator(Evaluator):
    """Summed cross-entropy, top-1 / top-5 hits and samples (train/metrics.py FIELDS), and a user metric."""

    def __init__(self, metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None) -> None:
        from compressor.train.metrics import FIELDS

        self.metric = metric
        self.sums = torch.zeros(len(FIELDS), dtype=torch.float64)

    def update(self, outputs: Any, targets: Any) -> None:
        from compressor.train.metrics import batch_sums

        self.sums += batch_sums(outputs, targets, self.metric)

    def compute(self, gather: Gather = alone) -> dict[str, float]:
        from compressor.train.metrics import from_sums

        return from_sums(sum(gather(self.sums)), with_metric=self.metric is not None)


@TASKS.register("classification")
class Classification(Task):
    primary, primary_label, primary_unit = "top1", "top-1", "%"
    columns = (("top1", "top-1 %", 2), ("top5", "top-5 %", 2), ("loss", "loss", 4))

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        super().__init__(num_classes)
        self.label_smoothing = label_smoothing

    def summary(self, metrics: dict[str, float]) -> str:
        return f"top1 {metrics['top1']:.2f}% loss {metrics['loss']:.4f}"

    def criterion(self, outputs: Any, targets: Any, model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=self.label_smoothing)

    def distill(self, student: Any, teacher: Any, temperature: float) -> torch.Tensor:
        t = temperature
        return F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                        log_target=True, reduction="batchmean") * t * t

    def evaluator(self, model: Optional[nn.Module] = None,
                  metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None) -> Evaluator:
        return ClassificationEvaluator(metric)
