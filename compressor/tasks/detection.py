"""Detection: the model's own loss, COCO mAP50-95 / mAP50 (points 0-100) on postprocessed boxes, MSE distillation
of the raw head tensors, the head kept out of pruning, and the parity rule for raw head outputs.

A detection model (compressor/models: YOLODetector, the torchvision detectors) keeps this contract:
- forward(x (N, 3, H, W) in [0, 1]); train mode: what its own loss takes; eval mode: raw head tensors in the layout
  `model.output_layout` names ("yolo" or "boxes_scores", see compressor/tasks/boxes.py);
- `model.detection_loss(outputs, targets: BoxTargets)` -> scalar, `model.protected_modules()` -> module names,
  `model.num_classes`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from compressor.errors import ModelLoadError, ParityError, UsageError
from compressor.tasks.base import Evaluator, Gather, Task, alone
from compressor.tasks.boxes import LAYOUTS, boxes_and_scores, postprocess
from compressor.tasks.coco_eval import coco_map
from compressor.tasks.registry import TASKS


class DetectionEvaluator(Evaluator):
    """Keeps every image's postprocessed detections and ground truth (CPU tensors); COCO mAP at the end."""

    def __init__(self, num_classes: int, layout: str, *, conf: float = 0.001, iou: float = 0.7,
                 max_det: int = 300) -> None:
        if layout not in LAYOUTS:
            raise ModelLoadError(f"unknown detection output layout {layout!r}.",
                                 hint=f"A detection model sets output_layout to one of {', '.join(LAYOUTS)}.")
        self.num_classes, self.layout = num_classes, layout
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.predictions: list[dict[str, torch.Tensor]] = []
        self.ground_truth: list[dict[str, torch.Tensor]] = []

    def update(self, outputs: Any, targets: Any) -> None:
        """`outputs`: one batch's eval-mode outputs (PyTorch's, or an exported file's as torch tensors);
        `targets`: its BoxTargets (boxes in the same input pixels)."""
        detections = postprocess(outputs, self.layout, conf=self.conf, iou=self.iou, max_det=self.max_det,
                                 size=tuple(targets.size))
        if len(detections) != len(targets):
            raise ValueError(f"the outputs hold {len(detections)} images but the targets {len(targets)}")
        self.predictions += [{k: v.detach().cpu() for k, v in d.items()} for d in detections]
        self.ground_truth += [{"boxes": b.detach().float().cpu().reshape(-1, 4), "labels": c.detach().long().cpu()}
                              for b, c in zip(targets.boxes, targets.labels)]

    def compute(self, gather: Gather = alone) -> dict[str, float]:
        """{"map50_95", "map50", "count"} over every process's images (gather: one object in, all out)."""
        predictions, ground_truth = [], []
        for preds, truth in gather((self.predictions, self.ground_truth)):
            predictions += preds
            ground_truth += truth
        return {**coco_map(ground_truth, predictions, self.num_classes), "count": float(len(ground_truth))}


@TASKS.register("detection")
class Detection(Task):
    name = "detection"
    primary, primary_label, primary_unit = "map50_95", "mAP50-95", ""  # points on 0-100
    parity_rtol = 1e-4
    unit_images = True  # its models take [0, 1] images (random_inputs)
    columns = (("map50_95", "mAP50-95", 2), ("map50", "mAP50", 2))  # the report's metric columns

    def __init__(self, num_classes: int, conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> None:
        super().__init__(num_classes)
        self.conf, self.iou, self.max_det = conf, iou, max_det

    # ------------------------------------------------------------------------------------------ training
    def criterion(self, outputs: Any, targets: Any, model: nn.Module) -> torch.Tensor:
        """The model's own detection loss of its train-mode outputs (`model`: the bare model, not a DDP wrapper)."""
        return model.detection_loss(outputs, targets)

    def loss(self, module: nn.Module, inputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The forward through `module` (possibly DDP-wrapped, so gradients synchronise), the loss from the bare
        model underneath."""
        return self.criterion(module(inputs), targets, getattr(module, "module", module))

    def teacher_outputs(self, teacher: nn.Module, inputs: torch.Tensor) -> Any:
        """The frozen teacher's raw train-mode head tensors (the structure the student's train mode outputs; eval
        mode would decode them), with its normalisation and dropout layers in eval mode so nothing about the teacher
        changes (running statistics used, not updated); every module's mode is restored afterwards."""
        modes = {m: m.training for m in teacher.modules()}
        teacher.train()
        for m in teacher.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
                m.eval()
        try:
            with torch.no_grad():
                return teacher(inputs)
        finally:
            for m, training in modes.items():
                m.training = training

    def distill(self, student: Any, teacher: Any, temperature: float) -> torch.Tensor:
        """Mean squared error between the student's and the teacher's train-mode raw outputs (tensors, or lists /
        tuples / dicts of them in the same structure): summed squares over all elements of all outputs divided by
        their count, so the scale does not grow with anchors, levels or image size. `temperature` does not apply
        to a regression of raw outputs and is ignored."""
        pairs = list(_pairs(student, teacher))
        if not pairs:
            raise ValueError("distillation needs at least one output tensor")
        squares = sum(((s.float() - t.detach().float()) ** 2).sum() for s, t in pairs)
        return squares / sum(s.numel() for s, _ in pairs)

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluator(self, layout: Union[str, nn.Module, None] = None, metric: Optional[Callable[..., float]] = None,
                  *, model: Optional[nn.Module] = None) -> DetectionEvaluator:
        """A fresh COCO evaluation of outputs in `layout`: "yolo" / "boxes_scores", or the model (or its DDP
        wrapper) whose `output_layout` names it (also as `model=`)."""
        if metric is not None:
            raise UsageError("a custom metric is supported for classification only; detection reports COCO mAP.")
        source = model if layout is None else layout
        if source is None:
            raise UsageError("a detection evaluator needs the model (or its output layout) to decode outputs.")
        if not isinstance(source, str):
            bare = getattr(source, "module", source)
            source = getattr(bare, "output_layout", None)
            if source is None:
                raise ModelLoadError(f"the detection model {type(bare).__name__} does not name its output layout.",
                                     hint="A detection model sets output_layout = 'yolo' or 'boxes_scores'.")
        return DetectionEvaluator(self.num_classes, source, conf=self.conf, iou=self.iou, max_det=self.max_det)

    def summary(self, metrics: dict[str, float]) -> str:
        return f"{self.primary_label} {metrics['map50_95']:.2f} (mAP50 {metrics['map50']:.2f})"

    # ------------------------------------------------------------------------------------------ pruning
    def protected(self, model: nn.Module) -> list[str]:
        """The model's head layers (box/class predictors, DFL, anchors) that pruning must keep whole."""
        return list(getattr(model, "module", model).protected_modules())

    # ------------------------------------------------------------------------------------------ export
    def compare(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
        """The parity numbers of the raw head tensors: the module's compare()."""
        return compare(reference, candidate)

    def reduced_compare(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
        """A quantized detector: the module's reduced_compare()."""
        return reduced_compare(reference, candidate)


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
    """The parity numbers of an export's raw head tensors against PyTorch's, for deploy.verify.check.

    Judged as one tensor holding every output (max abs diff over all, max |reference| over all), which is
    exactly how the "yolo" layout's single tensor of pixel boxes and probabilities is judged, so both layouts
    meet the same rule; `outputs` lists each output's own numbers to show which part differs. No top-1
    agreement: a detection output has no class axis at position 1."""
    if len(reference) != len(candidate):
        raise ParityError(f"the export has {len(candidate)} outputs, the PyTorch model {len(reference)}.")
    if not reference:
        raise ValueError("no outputs to compare")
    per_output, total, count = [], 0.0, 0
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        if ref.shape != cand.shape:
            raise ParityError(f"output {index} shapes differ: PyTorch {ref.shape} vs export {cand.shape}.")
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        worst = float(diff.max()) if diff.size else 0.0
        per_output.append({"shape": list(ref.shape), "max_abs_diff": worst, "max_abs_reference": scale,
                           "relative_diff": worst / scale if scale > 0 else None})
        total, count = total + float(diff.sum()), count + diff.size
    samples = {int(ref.shape[0]) for ref in reference}
    if len(samples) != 1:
        raise ParityError(f"the outputs disagree on the batch size: {sorted(samples)}.")
    worst = max(o["max_abs_diff"] for o in per_output)
    scale = max(o["max_abs_reference"] for o in per_output)
    n = samples.pop()
    return {"max_abs_diff": worst, "mean_abs_diff": total / count if count else 0.0, "top1_agreement": None,
            "max_abs_reference": scale, "relative_diff": worst / scale if scale > 0 else None, "samples": n,
            "distinct_top1": None,
            "same_output_for_all": bool(n > 1 and all(np.all(ref == ref[:1]) for ref in reference)),
            "outputs": per_output}


REDUCED_CONF = 0.25  # anchors whose boxes a quantized file must keep: PyTorch's best class score at least this


def reduced_compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
    """The parity numbers of a quantized (int8 / fp16) detector's raw head tensors against the fp32 PyTorch ones.

    compare()'s rule (every value of every anchor within a fraction of the largest output) fails int8 YOLO11n on
    anchors nobody sees: a background anchor's box regression is unconstrained, and int8 moved one by 191 px of
    716 (allowed 179) while every detection kept its box. What a quantized detector must keep are its detections:
    so boxes count only on the anchors where PyTorch's best class score is at least REDUCED_CONF (Ultralytics'
    predict threshold), as a fraction of the largest such box coordinate; class scores count on every anchor, in
    probability units; `max_abs_diff` is the larger of the two with `max_abs_reference` 1, so verify.check's
    tolerance (verify.int8_rtol / fp16_rtol x 1) applies to both. The top-1 agreement is the share of those
    confident anchors whose best class is the same (None when there are none: an untrained detector; the class
    scores are still compared). The outputs' layout follows from their count: one tensor is "yolo", two are
    "boxes_scores" (compressor/tasks/boxes.py)."""
    full = compare(reference, candidate)  # shapes, batch size and constant-output checks
    layout = "yolo" if len(reference) == 1 else "boxes_scores"
    ref_boxes, ref_scores = boxes_and_scores(tuple(torch.from_numpy(np.asarray(r)) for r in reference), layout)
    cand_boxes, cand_scores = boxes_and_scores(tuple(torch.from_numpy(np.asarray(c)) for c in candidate), layout)
    best, label = ref_scores.max(-1)
    confident = best >= REDUCED_CONF
    score_diff = float((ref_scores - cand_scores).abs().max()) if ref_scores.numel() else 0.0
    count = int(confident.sum())
    if count:
        scale = float(ref_boxes[confident].abs().max()) or 1.0
        box_diff = float((ref_boxes[confident] - cand_boxes[confident]).abs().max()) / scale
        agreement = float((cand_scores.argmax(-1)[confident] == label[confident]).float().mean())
    else:
        box_diff, agreement = 0.0, None
    worst = max(box_diff, score_diff)
    return {**full, "max_abs_diff": worst, "max_abs_reference": 1.0, "relative_diff": worst,
            "top1_agreement": agreement, "confident_anchors": count, "confidence": REDUCED_CONF,
            "box_relative_diff": box_diff, "score_abs_diff": score_diff}


PREDICTION_KEYS = ("boxes", "scores")  # what a dict of train-mode outputs predicts (the rest are features)


def _pairs(student: Any, teacher: Any, where: str = "outputs"):
    """(student tensor, teacher tensor) pairs of two outputs of the same structure."""
    if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
        if student.shape != teacher.shape:
            raise ValueError(f"distillation: the student's {where} has shape {tuple(student.shape)}, the teacher's "
                             f"{tuple(teacher.shape)}")
        yield student, teacher
    elif isinstance(student, (list, tuple)) and isinstance(teacher, (list, tuple)) and len(student) == len(teacher):
        for i, (s, t) in enumerate(zip(student, teacher)):
            yield from _pairs(s, t, f"{where}[{i}]")
    elif isinstance(student, dict) and isinstance(teacher, dict) and student.keys() == teacher.keys():
        # the head's predictions, not the features it reads (Ultralytics' train dict carries "feats", whose widths
        # pruning changes): a dict with predictions distils those alone
        keys = [k for k in student if k in PREDICTION_KEYS] or list(student)
        for key in keys:
            yield from _pairs(student[key], teacher[key], f"{where}[{key!r}]")
    else:
        raise ValueError(f"distillation: the student's and the teacher's {where} differ in structure "
                         f"({type(student).__name__} vs {type(teacher).__name__})")
