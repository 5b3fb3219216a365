"""Parity of a detector's .nms.onnx (NMS in the graph, compressor/deploy/nms_graph.py) with compressor's own
postprocess (compressor/tasks/boxes.py) of the PyTorch model's raw outputs at the same conf / iou / max_det, and the
mAP of the file's own detections.

The rule, per image: every detection of one side is matched to one of the other with the same class and IoU above
MATCH_IOU (ties at equal scores may come out in another order, so matching is by box, not by rank); matched boxes
agree within BOX_RTOL of the box's largest coordinate (at least 1 pixel) and scores within SCORE_ATOL; the counts are
equal. The one excuse is a decision on a threshold's edge, where ONNX Runtime's and PyTorch's last-bit differences
may flip a detection in or out: a detection one side lacks passes when its score is within EDGE of `conf` or of the
last kept score of a full (max_det) list, when its IoU with a higher-scoring detection of its class is within EDGE of
`iou`, when the other side instead kept an overlapping box of its class with the same score (within EDGE: which of
two tied boxes NMS keeps depends on the sort's order; saturated probabilities of 1.0 tie often), when its anchor's
two best class probabilities are within EDGE in PyTorch's outputs (its one label may differ), or when an excused
detection of the other side overlaps it above `iou` (NMS cascades from a flipped box).
Such detections are counted in the result ("edge_cases"); anything else is a ParityError, and so is a file's
detection that none of PyTorch's candidate anchors predicts (no box within MATCH_IOU with its score): an excuse
explains a decision that flipped, never a box that moved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from compressor.deploy.nms_graph import OUTPUTS, read_detections
from compressor.errors import ParityError
from compressor.tasks.boxes import boxes_and_scores, postprocess
from compressor.tasks.coco_eval import coco_map

MATCH_IOU = 0.99
BOX_RTOL = 1e-3
SCORE_ATOL = 1e-4
EDGE = 1e-4  # how near a threshold a score or an IoU may flip between runtimes

Detections = list[dict[str, np.ndarray]]  # per image: boxes (K, 4), scores (K,), labels (K,) int64


@torch.no_grad()
def reference_detections(model: nn.Module, inputs: torch.Tensor, *, layout: str, conf: float, iou: float,
                         max_det: int, batch_size: int = 64) -> Detections:
    """compressor's postprocess of the PyTorch model's raw eval outputs (boxes clipped to the input, as the graph
    clips them), per image, as numpy, with "candidates": PyTorch's anchors before NMS (candidate_anchors)."""
    model = model.eval()
    size = tuple(int(s) for s in inputs.shape[-2:])
    found: Detections = []
    for i in range(0, len(inputs), batch_size):
        outputs = model(inputs[i:i + batch_size])
        candidates = candidate_anchors(outputs, layout, conf=conf, size=size)
        for d, anchors in zip(postprocess(outputs, layout, conf=conf, iou=iou, max_det=max_det, size=size),
                              candidates):
            found.append({**{k: v.detach().cpu().numpy() for k, v in d.items()}, "candidates": anchors})
    return found


def candidate_anchors(outputs: Any, layout: str, *, conf: float, size: tuple[int, int]) -> list[dict[str, np.ndarray]]:
    """Per image, every anchor that is a candidate (best class probability above conf - EDGE) before NMS: its
    clipped box, best probability and label, and whether its label is ambiguous (its two best probabilities within
    EDGE: the one label, the first best class, can differ between runtimes, and with it the class NMS puts it in).
    What a file's detection must be one of; an ambiguous anchor's flip is an edge case."""
    boxes, scores = boxes_and_scores(outputs, layout)
    best, labels = scores.max(-1)
    second = scores.topk(2, dim=-1).values[..., 1] if scores.shape[-1] > 1 else torch.full_like(best, -1.0)
    keep = best > conf - EDGE
    h, w = size
    limits = boxes.new_tensor([w, h, w, h])
    return [{"boxes": torch.minimum(b[k].clamp(min=0), limits).cpu().numpy(), "scores": s[k].cpu().numpy(),
             "labels": c[k].cpu().numpy(), "ambiguous": (s[k] - t[k] <= EDGE).cpu().numpy()}
            for b, s, c, t, k in zip(boxes, best, labels, second, keep)]


def file_detections(session: Any, inputs: Any, *, batch_size: int = 64, source: str = "the NMS file") -> Detections:
    """An .nms.onnx session's detections on `inputs` (a tensor or an array), per image."""
    from compressor.deploy.onnx_runtime import onnx_feed

    data = inputs.detach().cpu().numpy() if hasattr(inputs, "detach") else np.asarray(inputs)
    names = [o.name for o in session.get_outputs()]
    missing = [n for n in OUTPUTS if n not in names]
    if missing:
        raise ParityError(f"{source} lacks the outputs {', '.join(missing)}; an NMS file has {', '.join(OUTPUTS)}.")
    found: Detections = []
    for i in range(0, len(data), batch_size):
        found += read_detections(session.run(None, onnx_feed(session, data[i:i + batch_size], source)), names)
    return found


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (n, 4) with every box of `b` (m, 4), x0, y0, x1, y1; (n, m)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *, conf: float, iou: float,
                max_det: int) -> dict[str, Any]:
    """One image's matching (see the module docstring): pairs (reference index, candidate index), the differences
    of the pairs, and the unmatched detections of each side split into excused (threshold edges) and not."""
    sides = (reference, candidate)
    same_class = reference["labels"][:, None] == candidate["labels"][None, :]
    overlap = np.where(same_class, box_iou(reference["boxes"], candidate["boxes"]), 0.0)
    pairs, taken = [], set()
    for i in np.argsort(-reference["scores"], kind="stable"):
        free = [j for j in np.argsort(-overlap[i], kind="stable") if j not in taken]
        if free and overlap[i, free[0]] > MATCH_IOU:
            pairs.append((int(i), int(free[0])))
            taken.add(free[0])
    matched = ({i for i, _ in pairs}, {j for _, j in pairs})
    box_diff, box_rel, score_diff = 0.0, 0.0, 0.0
    for i, j in pairs:
        ref_box, cand_box = reference["boxes"][i].astype(np.float64), candidate["boxes"][j].astype(np.float64)
        diff = float(np.abs(ref_box - cand_box).max())
        box_diff, box_rel = max(box_diff, diff), max(box_rel, diff / max(float(np.abs(ref_box).max()), 1.0))
        score_diff = max(score_diff, abs(float(reference["scores"][i]) - float(candidate["scores"][j])))

    # the unmatched of both sides, highest score first, so a flipped box is excused before what it cascades to
    unmatched = sorted(((float(sides[s]["scores"][k]), s, k) for s in (0, 1) for k in range(len(sides[s]["scores"]))
                        if k not in matched[s]), reverse=True)
    excused: list[tuple[int, int]] = []
    unexplained: list[tuple[int, int]] = []
    lone = [(s, k) for _, s, k in unmatched]
    for score, s, k in unmatched:
        if s == 1 and not _is_candidate(reference.get("candidates"), candidate, k):
            unexplained.append((s, k))  # no anchor of the PyTorch model predicts this box: not a flipped decision
        elif _on_edge(sides, excused, lone, s, k, conf=conf, iou=iou, max_det=max_det):
            excused.append((s, k))
        else:
            unexplained.append((s, k))
    return {"pairs": pairs, "excused": excused, "unexplained": unexplained, "max_box_diff": box_diff,
            "max_box_relative_diff": box_rel, "max_score_diff": score_diff,
            "counts": (len(reference["scores"]), len(candidate["scores"]))}


def _is_candidate(candidates: Optional[dict[str, np.ndarray]], side: dict[str, np.ndarray], k: int) -> bool:
    """Whether detection k of the file is one of PyTorch's candidate anchors (same box within MATCH_IOU, score
    within SCORE_ATOL, same class unless the anchor's label is ambiguous); True when the candidates are unknown."""
    if candidates is None:
        return True
    close = np.abs(candidates["scores"].astype(np.float64) - float(side["scores"][k])) <= SCORE_ATOL
    close &= (candidates["labels"] == side["labels"][k]) | candidates["ambiguous"]
    if not close.any():
        return False
    return bool((box_iou(side["boxes"][k], candidates["boxes"][close])[0] > MATCH_IOU).any())


def _on_edge(sides: Sequence[dict[str, np.ndarray]], excused: list[tuple[int, int]], lone: list[tuple[int, int]],
             s: int, k: int, *, conf: float, iou: float, max_det: int) -> bool:
    """Whether detection k of side s, which the other side lacks, sits on a threshold's edge (module docstring).
    `excused`: the (side, index) already excused; `lone`: every unmatched (side, index)."""
    own, other = sides[s], sides[1 - s]
    score, label, box = float(own["scores"][k]), int(own["labels"][k]), own["boxes"][k]
    if abs(score - conf) <= EDGE:
        return True
    anchors = sides[0].get("candidates")  # PyTorch's anchors whose label may differ between the runtimes
    flips = None if anchors is None else anchors["boxes"][anchors["ambiguous"]]
    if flips is not None and len(flips) and (box_iou(box, flips)[0] > MATCH_IOU).any():
        return True
    if len(other["scores"]) >= max_det and score <= float(other["scores"].min()) + EDGE:
        return True
    tied = [j for t, j in lone if t == 1 - s and int(other["labels"][j]) == label
            and abs(float(other["scores"][j]) - score) <= EDGE]  # equal scores: NMS's order between them is arbitrary
    if tied and (box_iou(box, other["boxes"][tied])[0] > iou - EDGE).any():
        return True
    for side in sides:  # a higher-scoring box of its class whose IoU with it is on the NMS threshold's edge
        rivals = (side["labels"] == label) & (side["scores"] >= score - EDGE)
        if side is own:
            rivals[k] = False
        if rivals.any() and (np.abs(box_iou(box, side["boxes"][rivals])[0] - iou) <= EDGE).any():
            return True
    flipped = [j for t, j in excused if t == 1 - s and int(other["labels"][j]) == label
               and float(other["scores"][j]) >= score - EDGE]  # a box only the other side kept suppressed it there
    return bool(flipped) and bool((box_iou(box, other["boxes"][flipped])[0] > iou - EDGE).any())


def compare_detections(reference: Detections, candidate: Detections, *, conf: float, iou: float, max_det: int,
                       label: str = "the NMS file") -> dict[str, Any]:
    """The parity numbers of `candidate` (the file's detections) against `reference` (postprocess of PyTorch's raw
    outputs), per image in the same order; ParityError naming the first disagreements."""
    if len(reference) != len(candidate):
        raise ParityError(f"{label} returned detections for {len(candidate)} images, the PyTorch model for "
                          f"{len(reference)}.")
    problems: list[str] = []
    total = {"pairs": 0, "excused": 0, "count_mismatches": 0, "max_box_diff": 0.0, "max_box_relative_diff": 0.0,
             "max_score_diff": 0.0}
    for index, (ref, cand) in enumerate(zip(reference, candidate)):
        m = match_image(ref, cand, conf=conf, iou=iou, max_det=max_det)
        total["pairs"] += len(m["pairs"])
        total["excused"] += len(m["excused"])
        total["count_mismatches"] += int(m["counts"][0] != m["counts"][1])
        for key in ("max_box_diff", "max_box_relative_diff", "max_score_diff"):
            total[key] = max(total[key], m[key])
        for s, k in m["unexplained"]:
            d = (ref, cand)[s]
            problems.append(f"image {index}: a class-{int(d['labels'][k])} detection at "
                            f"{', '.join(f'{v:.1f}' for v in d['boxes'][k])} (score {float(d['scores'][k]):.4f}) "
                            f"only {'the PyTorch postprocess' if s == 0 else label} has "
                            f"({m['counts'][0]} vs {m['counts'][1]} detections)")
        if m["max_box_relative_diff"] > BOX_RTOL:
            problems.append(f"image {index}: matched boxes differ by {m['max_box_diff']:.3g} pixels "
                            f"({m['max_box_relative_diff']:.3g} of the box's size, allowed {BOX_RTOL:g})")
        if m["max_score_diff"] > SCORE_ATOL:
            problems.append(f"image {index}: matched scores differ by {m['max_score_diff']:.3g} "
                            f"(allowed {SCORE_ATOL:g})")
    result = {"samples": len(reference), "detections": int(sum(len(r["scores"]) for r in reference)),
              "file_detections": int(sum(len(c["scores"]) for c in candidate)), "matched": total["pairs"],
              "edge_cases": total["excused"], "count_mismatches": total["count_mismatches"],
              "max_box_diff": total["max_box_diff"], "max_box_relative_diff": total["max_box_relative_diff"],
              "max_score_diff": total["max_score_diff"], "box_rtol": BOX_RTOL, "score_atol": SCORE_ATOL,
              "match_iou": MATCH_IOU, "conf": conf, "iou": iou, "max_det": max_det, "precision": "fp32",
              "artifact": label, "passed": not problems}
    if result["detections"] == 0:
        result["note"] = (f"{label}: no detections above conf {conf} on the {len(reference)} samples (an untrained "
                          "model's scores stay low), so its parity shows only that both sides find none; verify "
                          "with trained weights or a lower export.nms.conf.")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ParityError(f"{label} disagrees with compressor's postprocess of the PyTorch outputs (conf {conf}, iou "
                          f"{iou}, max_det {max_det}) on {len(reference)} validation samples: "
                          + "; ".join(problems[:3]) + more + ".",
                          hint="The NMS graph is not written as verified; export.nms.enabled: false keeps the raw "
                               "model.onnx, whose parity is checked on its own.")
    return result


def verify_nms_onnx(model: nn.Module, path: str | Path, inputs: torch.Tensor, *, layout: str, conf: float,
                    iou: float, max_det: int, batch_size: int = 64) -> dict[str, Any]:
    """The NMS file's detections on `inputs` against compressor's postprocess of `model`'s raw outputs
    (compare_detections: ParityError on disagreement)."""
    from compressor.deploy.onnx_runtime import create_session

    label = f"ONNX {Path(path).name}"
    session = create_session(path, "ort-cpu")
    candidate = file_detections(session, inputs, batch_size=batch_size, source=repr(Path(path).name))
    reference = reference_detections(model, inputs, layout=layout, conf=conf, iou=iou, max_det=max_det,
                                     batch_size=batch_size)
    return compare_detections(reference, candidate, conf=conf, iou=iou, max_det=max_det, label=label)


def evaluate_nms_onnx(path: str | Path, batches: Iterable[tuple[torch.Tensor, Any]], num_classes: int, *,
                      session: Optional[Any] = None) -> dict[str, float]:
    """COCO mAP50-95 / mAP50 (points) of the NMS file's own detections over (images, BoxTargets) batches: what
    a deployment that reads num_dets / det_boxes / det_scores / det_classes scores (its conf and max_det apply)."""
    from compressor.deploy.onnx_runtime import create_session

    session = session or create_session(path, "ort-cpu")
    predictions, truth = [], []
    for images, targets in batches:
        for d in file_detections(session, images, batch_size=len(images), source=repr(Path(path).name)):
            predictions.append({k: torch.from_numpy(v) for k, v in d.items()})
        truth += [{"boxes": b.detach().float().cpu().reshape(-1, 4), "labels": c.detach().long().cpu()}
                  for b, c in zip(targets.boxes, targets.labels)]
    return {**coco_map(truth, predictions, num_classes), "count": float(len(truth))}
