"""Semantic segmentation: (N, classes, H, W) logits against (N, H, W) class-id masks.

Training: per-pixel cross-entropy over the pixels whose mask value is not `ignore_index` (255 by default: the
"void" label of VOC-style masks); logits of another size than the masks are resized bilinearly to the masks'.
Distillation: per-pixel KL divergence between the softened class distributions, averaged over the pixels.
Evaluation: mIoU (percent) through torchmetrics' MulticlassJaccardIndex (average="macro", ignore_index), pixel
accuracy (percent) and the image count. Every rank accumulates a confusion matrix; compute() sums every rank's
matrix first, so the mIoU of a sharded evaluation is the mIoU of the whole set, not a mean of per-rank means.

mIoU is the mean IoU over the classes present in the targets or the predictions: a class that neither occurs in
any mask nor is predicted anywhere has no IoU (0/0) and is not counted (torchmetrics >= 1.0 gives such classes
weight 0 in the macro average; tests/test_segmentation.py checks it). A class that occurs only in predictions
counts with IoU 0.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import DataError, UsageError
from compressor.tasks.base import Evaluator, Gather, Task, alone, as_tensors
from compressor.tasks.registry import TASKS

MASK_HINT = ("Masks hold one class id per pixel: 0..num_classes-1, or the task's ignore_index for pixels that do "
             "not count; set model.num_classes to the number of mask classes (background included).")


def as_masks(targets: Any, num_classes: int, ignore_index: int) -> torch.Tensor:
    """A batch's masks as int64 (N, H, W) (an (N, 1, H, W) batch is squeezed); DataError for masks that are not
    integer class ids or hold a value that is neither a class nor ignore_index."""
    if not isinstance(targets, torch.Tensor):
        raise DataError(f"segmentation targets must be a tensor of masks (N, H, W), got {type(targets).__name__}.",
                        hint=MASK_HINT)
    masks = targets[:, 0] if targets.dim() == 4 and targets.shape[1] == 1 else targets
    if masks.dim() != 3 or masks.is_floating_point() or masks.is_complex():
        raise DataError(f"segmentation targets must be integer masks (N, H, W); got {masks.dtype} of shape "
                        f"{list(targets.shape)}.", hint=MASK_HINT)
    masks = masks.long()
    valid = masks[masks != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        bad = int(valid.max()) if int(valid.max()) >= num_classes else int(valid.min())
        raise DataError(f"a mask holds class id {bad}, but the segmentation task has {num_classes} classes "
                        f"(0..{num_classes - 1}) and ignore_index {ignore_index}.", hint=MASK_HINT)
    return masks


def logits_at(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, h, w) logits resized bilinearly to (H, W) = size when they differ."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationEvaluator(Evaluator):
    """A confusion matrix (torchmetrics' MulticlassJaccardIndex state), images and a user metric's sum."""

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 metric: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None) -> None:
        from compressor.extras import require

        self._classification = require("torchmetrics.classification", "seg", "the segmentation task's mIoU")
        self.num_classes, self.ignore_index, self.metric = num_classes, ignore_index, metric
        self.jaccard = self._new_metric()
        self.images = 0
        self.metric_sum = 0.0

    def _new_metric(self):
        # sync_on_compute=False: compute() combines the ranks itself (through `gather`), and torchmetrics' own
        # synchronisation would be a collective every rank must enter
        return self._classification.MulticlassJaccardIndex(
            num_classes=self.num_classes, average="macro", ignore_index=self.ignore_index, validate_args=False,
            sync_on_compute=False)

    def update(self, outputs: Any, targets: Any) -> None:
        logits = as_tensors(outputs)[0]
        masks = as_masks(targets, self.num_classes, self.ignore_index).to(logits.device)
        if logits.dim() != 4 or logits.shape[0] != masks.shape[0] or logits.shape[1] != self.num_classes:
            raise DataError(f"segmentation outputs of shape {list(logits.shape)} do not fit masks of shape "
                            f"{list(masks.shape)} and {self.num_classes} classes: the model must return "
                            "(N, classes, H, W) logits.", hint=MASK_HINT)
        preds = logits_at(logits.float(), masks.shape[-2:]).argmax(1)
        self.jaccard.to(preds.device)
        self.jaccard.update(preds, masks)
        self.images += len(masks)
        if self.metric is not None:
            self.metric_sum += _metric_value(self.metric, logits, masks) * len(masks)

    def compute(self, gather: Gather = alone) -> dict[str, float]:
        parts = gather((self.jaccard.confmat.detach().cpu(), self.images, self.metric_sum))
        confmat = sum(part[0] for part in parts)
        images = sum(part[1] for part in parts)
        pixels = int(confmat.sum())
        if pixels:
            total = self._new_metric()
            total.confmat = confmat.to(total.confmat.dtype)  # every rank's matrix: the whole set's IoU
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "compute before update": the state was set, not updated
                miou = 100.0 * float(total.compute())
            pixel_acc = 100.0 * float(confmat.diagonal().sum()) / pixels
        else:
            miou = pixel_acc = 0.0
        metrics = {"miou": miou, "pixel_acc": pixel_acc, "count": int(images)}
        if self.metric is not None:
            metrics["metric"] = sum(part[2] for part in parts) / max(images, 1)
        return metrics


def _metric_value(metric: Callable[[torch.Tensor, torch.Tensor], Any], outputs: torch.Tensor,
                  targets: torch.Tensor) -> float:
    value = metric(outputs, targets)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        name = getattr(metric, "__qualname__", type(metric).__name__)
        raise UsageError(f"the metric {name}(outputs, masks) returned {value!r}; it must return one finite number, "
                         "the batch's mean (compressor weights each batch by its images).")
    return float(value)


@TASKS.register("segmentation")
class Segmentation(Task):
    primary, primary_label, primary_unit = "miou", "mIoU", "%"
    parity_rtol = 1e-4
    unit_images = True  # its models take [0, 1] images (random_inputs)
    columns = (("miou", "mIoU %", 2), ("pixel_acc", "pixel acc. %", 2))  # the report's metric columns

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes)
        self.ignore_index = ignore_index

    # ------------------------------------------------------------------------------------------ training
    def criterion(self, outputs: Any, targets: Any, model: Optional[nn.Module] = None) -> torch.Tensor:
        """Mean cross-entropy over the pixels that are not ignore_index (0, still a graph node, when none is)."""
        logits = as_tensors(outputs)[0]
        masks = as_masks(targets, self.num_classes, self.ignore_index).to(logits.device)
        logits = logits_at(logits.float(), masks.shape[-2:])
        total = F.cross_entropy(logits, masks, ignore_index=self.ignore_index, reduction="sum")
        return total / (masks != self.ignore_index).sum().clamp_min(1)

    def distill(self, student: Any, teacher: Any, temperature: float, targets: Any = None) -> torch.Tensor:
        """KL(teacher || student) of the per-pixel class distributions at `temperature`, summed over classes,
        averaged over the pixels (with `targets`: over the pixels that are not ignore_index), times T^2."""
        t = temperature
        s_logits, t_logits = as_tensors(student)[0].float(), as_tensors(teacher)[0].float()
        t_logits = logits_at(t_logits, s_logits.shape[-2:])
        per_pixel = F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1), log_target=True,
                             reduction="none").sum(1)  # (N, H, W)
        if targets is None:
            return per_pixel.mean() * t * t
        masks = as_masks(targets, self.num_classes, self.ignore_index).to(per_pixel.device)
        valid = F.interpolate(masks[:, None].float(), size=per_pixel.shape[-2:], mode="nearest")[:, 0]
        valid = valid != self.ignore_index
        return (per_pixel * valid).sum() / valid.sum().clamp_min(1) * t * t

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluator(self, model: Optional[nn.Module] = None,
                  metric: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None) -> Evaluator:
        return SegmentationEvaluator(self.num_classes, self.ignore_index, metric)

    def summary(self, metrics: dict[str, float]) -> str:
        return f"mIoU {metrics['miou']:.2f}%, pixel accuracy {metrics['pixel_acc']:.2f}%"

    # ------------------------------------------------------------------------------------------ pruning
    def protected(self, model: nn.Module) -> list[str]:
        """The convolutions that produce the class channels (SegmentationLogits.protected_modules)."""
        method = getattr(model, "protected_modules", None)
        return list(method()) if callable(method) else []
