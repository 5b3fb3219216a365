"""From a detector's raw head tensors to per-image detections: decode, confidence filter, class-wise NMS.

Two output layouts (a detection model names its own in `model.output_layout`):
- "yolo": one tensor (N, 4 + C, A): cx, cy, w, h in input pixels, then C class probabilities (the layout of
  Ultralytics' eval-mode and ONNX output);
- "boxes_scores": a pair (boxes (N, A, 4) as x0, y0, x1, y1 in input pixels, scores (N, A, C) probabilities).
Both become (boxes xyxy, scores) first, then the same code runs, so a PyTorch model and its ONNX Runtime outputs
(given here as torch tensors) are post-processed identically.

Defaults are Ultralytics' validation ones (conf 0.001, IoU 0.7, at most 300 detections, at most 30000 boxes into
NMS) with one deliberate difference: multi-label is off, each anchor keeps only its best class. Ultralytics' validator
lets an anchor emit one detection per class above `conf`, which reads a few tenths of a point higher on mAP; one
label per anchor is what a deployed detector reports, and it is the same for every layout.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from compressor.errors import ModelLoadError

LAYOUTS = ("yolo", "boxes_scores")
MAX_NMS = 30000  # at most this many candidates (highest scores) per image go into NMS, as in Ultralytics


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre x, centre y, width, height -> x0, y0, x1, y1."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def boxes_and_scores(outputs: Any, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw outputs in `layout` as (boxes (N, A, 4) xyxy, scores (N, A, C)), float32."""
    if layout not in LAYOUTS:
        raise ModelLoadError(f"unknown detection output layout {layout!r}.",
                             hint=f"A detection model sets output_layout to one of {', '.join(LAYOUTS)}.")
    if isinstance(outputs, (list, tuple)) and layout == "yolo" and len(outputs) == 1:
        outputs = outputs[0]  # an exported file's single output, as a 1-tuple
    if layout == "yolo":
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 3 or outputs.shape[1] < 5:
            raise ModelLoadError(f"a 'yolo' layout detector must output one tensor (N, 4 + classes, anchors), got "
                                 f"{_describe(outputs)}.",
                                 hint="Check the model's output_layout; torchvision-style detectors use "
                                      "'boxes_scores'.")
        pred = outputs.float().transpose(1, 2)  # (N, A, 4 + C)
        return cxcywh_to_xyxy(pred[..., :4]), pred[..., 4:]
    if (not isinstance(outputs, (list, tuple)) or len(outputs) != 2
            or not all(isinstance(o, torch.Tensor) and o.ndim == 3 for o in outputs)
            or outputs[0].shape[-1] != 4 or outputs[0].shape[:2] != outputs[1].shape[:2]):
        raise ModelLoadError(f"a 'boxes_scores' layout detector must output (boxes (N, A, 4), scores (N, A, "
                             f"classes)), got {_describe(outputs)}.",
                             hint="Check the model's output_layout; Ultralytics-style detectors use 'yolo'.")
    return outputs[0].float(), outputs[1].float()


def postprocess(outputs: Any, layout: str, *, conf: float = 0.001, iou: float = 0.7, max_det: int = 300,
                size: Optional[tuple[int, int]] = None) -> list[dict[str, torch.Tensor]]:
    """Per image {"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,) int64}, highest score first.

    An anchor is a candidate when its best class probability is above `conf`; NMS at IoU `iou` runs within each
    class; `max_det` detections are kept. `size` (H, W) of the input clips boxes to the image (Ultralytics'
    validator clips too); None leaves them as predicted."""
    from torchvision.ops import batched_nms  # here: importing compressor.tasks stays light for classification

    boxes, scores = boxes_and_scores(outputs, layout)
    best, labels = scores.max(-1)  # (N, A): one label per anchor (multi-label off)
    results = []
    for image_boxes, image_best, image_labels in zip(boxes, best, labels):
        keep = image_best > conf
        b, s, c = image_boxes[keep], image_best[keep], image_labels[keep]
        if len(s) > MAX_NMS:
            top = s.topk(MAX_NMS).indices
            b, s, c = b[top], s[top], c[top]
        if size is not None:
            h, w = size
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
        kept = batched_nms(b, s, c, iou)[:max_det]  # sorted by decreasing score
        results.append({"boxes": b[kept], "scores": s[kept], "labels": c[kept].long()})
    return results


def _describe(outputs: Any) -> str:
    if isinstance(outputs, torch.Tensor):
        return f"a tensor of shape {tuple(outputs.shape)}"
    if isinstance(outputs, (list, tuple)):
        return f"a {type(outputs).__name__} of " + ", ".join(_describe(o) for o in outputs)
    return type(outputs).__name__
