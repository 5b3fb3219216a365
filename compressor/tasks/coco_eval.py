"""COCO box mAP (mAP50-95 and mAP50, in points 0-100) of in-memory detections, computed by the COCO evaluation
itself: faster-coco-eval (the [detect] extra) when installed, else pycocotools. The COCO dicts are built in memory,
nothing is written to disk.

The ground truth and predictions are per image: {"boxes" (K, 4) x0, y0, x1, y1, "labels" (K,) 0-based} and
{"boxes", "scores", "labels"}; category ids are class + 1 (every class is declared, classes without ground truth
are left out of the mean as COCO does); images without objects are included, so false positives on them count.
COCO's standard parameters apply: 10 IoU thresholds 0.50:0.05:0.95, 101 recall points, area "all", at most 100
detections per image.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Optional, Sequence

import numpy as np

from compressor.extras import require

BACKENDS = ("faster_coco_eval", "pycocotools")
MAX_DETS = 100  # COCO's last maxDets entry: what mAP is reported at


def coco_dicts(ground_truth: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]],
               num_classes: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The COCO ground-truth dataset and the detection results list (image ids from 1, annotation ids from 1:
    pycocotools treats id 0 as "unmatched")."""
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} prediction images")
    images, annotations, results = [], [], []
    for image_id, (truth, pred) in enumerate(zip(ground_truth, predictions), start=1):
        images.append({"id": image_id})
        for box, label in zip(_array(truth["boxes"]).reshape(-1, 4), _array(truth["labels"]).reshape(-1)):
            x, y, w, h = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        for box, score, label in zip(_array(pred["boxes"]).reshape(-1, 4), _array(pred["scores"]).reshape(-1),
                                     _array(pred["labels"]).reshape(-1)):
            results.append({"image_id": image_id, "category_id": int(label) + 1, "bbox": list(_xywh(box)),
                            "score": float(score)})
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def coco_map(ground_truth: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]], num_classes: int,
             backend: Optional[str] = None) -> dict[str, float]:
    """{"map50_95", "map50"} in points (0-100). `backend`: "faster_coco_eval" or "pycocotools"; None takes the
    first installed. No predictions at all give 0; no ground truth at all (mAP undefined) gives 0 too."""
    dataset, results = coco_dicts(ground_truth, predictions, num_classes)
    if not results or not dataset["annotations"]:
        return {"map50_95": 0.0, "map50": 0.0}
    precision, thresholds = _precision(dataset, results, _backend(backend))
    # precision: (IoU thresholds, recall points, classes, area ranges, max dets); -1 where a class has no truth
    every = precision[:, :, :, 0, -1]
    at50 = every[np.isclose(thresholds, 0.5)]
    return {"map50_95": _mean(every) * 100.0, "map50": _mean(at50) * 100.0}


def _backend(name: Optional[str]) -> str:
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown COCO evaluation backend {name!r}: one of {', '.join(BACKENDS)}")
        require(name, "detect", "COCO mAP")
        return name
    for candidate in BACKENDS:
        try:
            require(candidate, "detect", "COCO mAP")
            return candidate
        except ImportError:
            continue
    require(BACKENDS[0], "detect", "COCO mAP")  # raises MissingExtra naming the [detect] extra
    raise AssertionError("unreachable")


def _precision(dataset: dict[str, Any], results: list[dict[str, Any]], backend: str) -> tuple[np.ndarray, np.ndarray]:
    """COCO's accumulated precision array and its IoU thresholds; the libraries' progress prints are swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCO, COCOeval_faster

            quiet = lambda *args, **kwargs: None  # noqa: E731
            truth = COCO(dataset, print_function=quiet)
            evaluation = COCOeval_faster(truth, truth.loadRes(results), "bbox", print_function=quiet)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            truth = COCO()
            truth.dataset = dataset
            truth.createIndex()
            evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.params.maxDets = [1, 10, MAX_DETS]
        evaluation.evaluate()
        evaluation.accumulate()
    return np.asarray(evaluation.eval["precision"]), np.asarray(evaluation.params.iouThrs)


def _mean(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _xywh(box: np.ndarray) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1 - x0, y1 - y0
