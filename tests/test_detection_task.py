"""The detection task: postprocessing of both output layouts, COCO mAP against hand cases and both COCO libraries,
the evaluator across processes, the loss through a DDP-like wrapper, distillation, and the raw-output parity rule."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from compressor.deploy.config import VerifyConfig
from compressor.deploy.verify import check
from compressor.errors import ModelLoadError, ParityError, UsageError
from compressor.extras import MissingExtra
from compressor.tasks import TASKS, build_task
from compressor.tasks.boxes import postprocess
from compressor.tasks.coco_eval import coco_map
from compressor.tasks.detection import Detection, compare
from compressor.tasks.targets import BoxTargets

C = 3  # classes


def anchors_yolo(rows: list[tuple[float, float, float, float, int, float]], classes: int = C) -> torch.Tensor:
    """One image's "yolo" output (1, 4 + classes, A) from (cx, cy, w, h, class, probability) rows."""
    out = torch.zeros(1, 4 + classes, len(rows))
    for a, (cx, cy, w, h, cls, p) in enumerate(rows):
        out[0, :4, a] = torch.tensor([cx, cy, w, h])
        out[0, 4 + cls, a] = p
    return out


def as_boxes_scores(yolo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same anchors in the "boxes_scores" layout."""
    pred = yolo.transpose(1, 2)
    cx, cy, w, h = pred[..., :4].unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1), pred[..., 4:].clone()


class FakeDetector(nn.Module):
    """Emits fixed eval-mode outputs in its layout; train mode: two "levels" of raw tensors from a conv."""

    def __init__(self, outputs, layout: str) -> None:
        super().__init__()
        self.fixed, self.output_layout, self.num_classes = outputs, layout, C
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.loss_calls = []

    def forward(self, x):
        if self.training:
            y = self.bn(self.conv(x))
            return [y, y[:, :, ::2, ::2]]
        return self.fixed

    def detection_loss(self, outputs, targets):
        self.loss_calls.append((outputs, targets))
        return sum(o.square().mean() for o in outputs) + len(targets)

    def protected_modules(self):
        return ["conv"]


class WrapperLikeDDP(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.forwards = module, 0

    def forward(self, x):
        self.forwards += 1
        return self.module(x)


def targets(boxes: list[list[list[float]]], labels: list[list[int]], size=(100, 100)) -> BoxTargets:
    return BoxTargets([torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
                      [torch.tensor(c, dtype=torch.int64) for c in labels], size)


# ---------------------------------------------------------------------------------------------- postprocess
ROWS = [(50, 40, 20, 10, 1, 0.9),  # -> (40, 35, 60, 45), class 1
        (51, 40, 20, 10, 1, 0.8),  # a duplicate (IoU 0.9) of lower score: removed by NMS
        (51, 40, 20, 10, 2, 0.7),  # the same box of another class: kept (NMS is per class)
        (10, 10, 8, 8, 0, 0.0005),  # below conf 0.001: dropped
        (80, 80, 10, 10, 0, 0.5)]


@pytest.mark.parametrize("layout", ["yolo", "boxes_scores"])
def test_postprocess_decodes_and_suppresses_duplicates(layout):
    yolo = anchors_yolo(ROWS)
    outputs = yolo if layout == "yolo" else as_boxes_scores(yolo)
    [det] = postprocess(outputs, layout)
    assert det["labels"].dtype == torch.int64
    assert det["labels"].tolist() == [1, 2, 0]
    assert torch.allclose(det["scores"], torch.tensor([0.9, 0.7, 0.5]))
    assert torch.allclose(det["boxes"], torch.tensor([[40., 35, 60, 45], [41, 35, 61, 45], [75, 75, 85, 85]]))


def test_postprocess_each_anchor_keeps_only_its_best_class_and_max_det():
    out = anchors_yolo([(50, 50, 10, 10, 0, 0.6), (20, 20, 10, 10, 2, 0.3)])
    out[0, 4 + 1, 0] = 0.4  # a second class on the first anchor: not reported (multi-label off)
    [det] = postprocess(out, "yolo")
    assert det["labels"].tolist() == [0, 2]
    [top] = postprocess(out, "yolo", max_det=1)
    assert top["labels"].tolist() == [0] and top["scores"].tolist() == pytest.approx([0.6])


def test_postprocess_batches_clips_and_accepts_exported_one_tuples():
    out = torch.cat([anchors_yolo([(5, 50, 20, 10, 0, 0.9)]), anchors_yolo([(50, 50, 10, 10, 1, 0.0)])])
    first, second = postprocess((out,), "yolo", size=(100, 100))  # ONNX Runtime: a 1-tuple of outputs
    assert first["boxes"].tolist() == [[0.0, 45.0, 15.0, 55.0]]  # x0 -5 clipped to 0
    assert len(second["boxes"]) == 0 and second["boxes"].shape == (0, 4)


def test_postprocess_rejects_a_wrong_layout_or_shape():
    with pytest.raises(ModelLoadError, match="unknown detection output layout 'ssd'"):
        postprocess(torch.zeros(1, 7, 5), "ssd")
    with pytest.raises(ModelLoadError, match=r"'boxes_scores' layout .* got a tensor of shape \(1, 7, 5\)"):
        postprocess(torch.zeros(1, 7, 5), "boxes_scores")
    with pytest.raises(ModelLoadError, match="'yolo' layout"):
        postprocess(torch.zeros(2, 7), "yolo")


# ---------------------------------------------------------------------------------------------- COCO mAP
def gt(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


BACKENDS = ["faster_coco_eval", "pycocotools"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_hand_cases(backend):
    truth = [gt([[0, 0, 10, 10]], [0])]
    perfect = coco_map(truth, [pred([[0, 0, 10, 10]], [0.9], [0])], C, backend)
    assert perfect["map50_95"] == pytest.approx(100.0) and perfect["map50"] == pytest.approx(100.0)
    # shifted by 2.5: IoU 75/125 = 0.6 exactly; COCO matches at IoU >= threshold, so 0.50, 0.55 and 0.60 count
    exact = coco_map(truth, [pred([[2.5, 0, 12.5, 10]], [0.9], [0])], C, backend)
    assert exact["map50_95"] == pytest.approx(30.0) and exact["map50"] == pytest.approx(100.0)
    # shifted by 2.6: IoU 74/126 = 0.587, counted at 0.50 and 0.55 only
    below = coco_map(truth, [pred([[2.6, 0, 12.6, 10]], [0.9], [0])], C, backend)
    assert below["map50_95"] == pytest.approx(20.0) and below["map50"] == pytest.approx(100.0)
    assert coco_map(truth, [pred([], [], [])], C, backend) == {"map50_95": 0.0, "map50": 0.0}
    wrong_class = coco_map(truth, [pred([[0, 0, 10, 10]], [0.9], [1])], C, backend)
    assert wrong_class["map50_95"] == pytest.approx(0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_counts_false_positives_on_images_without_objects(backend):
    truth = [gt([[0, 0, 10, 10]], [0]), gt([], [])]
    # a confident false positive on the empty image ranks above the true positive: precision 0.5 at every recall
    result = coco_map(truth, [pred([[0, 0, 10, 10]], [0.5], [0]), pred([[20, 20, 30, 30]], [0.9], [0])], C, backend)
    assert result["map50"] == pytest.approx(50.0) and result["map50_95"] == pytest.approx(50.0)


def random_case(seed: int, images: int = 12):
    g = torch.Generator().manual_seed(seed)
    truth, preds = [], []
    for i in range(images):
        k = int(torch.randint(0, 4, (1,), generator=g))  # some images have no objects
        xy = torch.rand(k, 2, generator=g) * 60
        wh = 5 + torch.rand(k, 2, generator=g) * 30
        boxes, labels = torch.cat([xy, xy + wh], 1), torch.randint(0, C, (k,), generator=g)
        truth.append({"boxes": boxes, "labels": labels})
        noisy = boxes + torch.randn(k, 4, generator=g) * 3  # near misses at various IoUs
        extra = torch.rand(2, 2, generator=g) * 60
        preds.append({"boxes": torch.cat([noisy, torch.cat([extra, extra + 12], 1)]),
                      "scores": torch.rand(k + 2, generator=g),
                      "labels": torch.cat([labels, torch.randint(0, C, (2,), generator=g)])})
    return truth, preds


def test_map_backends_agree_on_a_random_case():
    truth, preds = random_case(0)
    fast = coco_map(truth, preds, C, "faster_coco_eval")
    slow = coco_map(truth, preds, C, "pycocotools")
    assert 5.0 < fast["map50_95"] < 95.0  # a case that is neither trivial nor empty
    assert fast["map50_95"] == pytest.approx(slow["map50_95"], abs=1e-6)
    assert fast["map50"] == pytest.approx(slow["map50"], abs=1e-6)


def test_map_falls_back_to_pycocotools_and_names_the_extra_when_both_are_missing(monkeypatch):
    truth, preds = random_case(1)
    expected = coco_map(truth, preds, C, "pycocotools")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import -> ImportError
    assert coco_map(truth, preds, C) == expected
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(MissingExtra, match=r"COCO mAP needs faster_coco_eval") as info:
        coco_map(truth, preds, C)
    assert "compressor[detect]" in str(info.value)


# ---------------------------------------------------------------------------------------------- evaluator
def batches():
    """Two batches of raw "yolo" outputs with their targets (an image without objects in each)."""
    first = torch.cat([anchors_yolo([(20, 20, 10, 10, 0, 0.9), (60, 60, 20, 20, 1, 0.4)]),
                       anchors_yolo([(30, 30, 10, 10, 2, 0.8), (70, 70, 10, 10, 1, 0.2)])])
    second = torch.cat([anchors_yolo([(40, 40, 20, 10, 1, 0.7), (10, 80, 8, 8, 2, 0.6)]),
                        anchors_yolo([(50, 50, 10, 10, 0, 0.3), (52, 50, 10, 10, 0, 0.95)])])
    return [(first, targets([[[15, 15, 25, 25], [48, 52, 68, 72]], []], [[0, 1], []])),
            (second, targets([[[31, 35, 51, 45]], [[45, 45, 55, 55]]], [[1], [0]]))]


def test_gathered_evaluators_equal_one_evaluator_fed_everything():
    task = Detection(C)
    whole = task.evaluator("yolo")
    parts = [task.evaluator("yolo"), task.evaluator("yolo")]
    for (outputs, target), part in zip(batches(), parts):
        whole.update(outputs, target)
        part.update(outputs, target)
    expected = whole.compute()
    assert expected["count"] == 4.0
    assert 0.0 < expected["map50_95"] < 100.0 and expected["map50_95"] < expected["map50"]
    gathered = parts[0].compute(lambda mine: [mine, (parts[1].predictions, parts[1].ground_truth)])
    assert gathered == pytest.approx(expected)
    assert parts[0].compute()["count"] == 2.0  # alone: its own images only


def test_evaluator_reads_the_layout_from_the_model_through_a_wrapper_and_handles_empty_images():
    task = build_task("detection", C)
    yolo = torch.cat([anchors_yolo([(20, 20, 10, 10, 0, 0.9)]), anchors_yolo([(20, 20, 10, 10, 0, 0.95)])])
    model = FakeDetector(as_boxes_scores(yolo), "boxes_scores").eval()
    evaluator = task.evaluator(model=WrapperLikeDDP(model))
    assert evaluator.layout == "boxes_scores"
    evaluator.update(model(torch.zeros(2, 3, 8, 8)), targets([[[15, 15, 25, 25]], []], [[0], []]))
    # the second image has no objects: its detection is a false positive that outranks the true positive
    assert evaluator.ground_truth[1]["boxes"].shape == (0, 4)
    assert evaluator.compute() == {"map50_95": pytest.approx(50.0), "map50": pytest.approx(50.0), "count": 2.0}


def test_evaluator_refuses_unknown_layouts_and_custom_metrics():
    task = Detection(C)
    with pytest.raises(ModelLoadError, match="unknown detection output layout 'xyxy'"):
        task.evaluator("xyxy")
    with pytest.raises(ModelLoadError, match="does not name its output layout"):
        task.evaluator(nn.Linear(2, 2))
    with pytest.raises(UsageError, match="classification only"):
        task.evaluator("yolo", metric=lambda o, t: 0.0)


def test_summary_and_registration():
    task = build_task("detection", C, iou=0.6)
    assert isinstance(task, Detection) and TASKS.get("detection") is Detection and task.iou == 0.6
    assert task.primary == "map50_95" and task.primary_label == "mAP50-95" and task.name == "detection"
    assert task.summary({"map50_95": 41.234, "map50": 63.1, "count": 5.0}) == "mAP50-95 41.23 (mAP50 63.10)"


# ---------------------------------------------------------------------------------------------- training
def test_loss_forwards_through_the_wrapper_and_uses_the_bare_models_loss():
    torch.manual_seed(0)
    model = FakeDetector(None, "yolo").train()
    wrapper = WrapperLikeDDP(model)
    x, t = torch.rand(2, 3, 8, 8), targets([[[1, 1, 4, 4]], []], [[0], []], size=(8, 8))
    loss = Detection(C).loss(wrapper, x, t)
    assert wrapper.forwards == 1 and len(model.loss_calls) == 1
    outputs, seen = model.loss_calls[0]
    assert seen is t and [o.shape for o in outputs] == [(2, 4, 8, 8), (2, 4, 4, 4)]
    assert loss.item() == pytest.approx(sum(o.square().mean() for o in outputs).item() + 2)
    loss.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_distill_is_zero_for_identical_outputs_positive_otherwise_and_independent_of_anchor_count():
    task = Detection(C)
    a = [torch.randn(2, 5, 8, 8), torch.randn(2, 5, 4, 4)]
    assert task.distill(a, [t.clone() for t in a], 2.0).item() == 0.0
    shifted = [t + 0.5 for t in a]
    assert task.distill(shifted, a, 2.0).item() == pytest.approx(0.25)
    bigger = [torch.randn(2, 5, 16, 16), torch.randn(2, 5, 8, 8)]  # 4x the anchors, same per-element error
    assert task.distill([t + 0.5 for t in bigger], bigger, 2.0).item() == pytest.approx(0.25)
    student = torch.zeros(2, 3, requires_grad=True)
    task.distill((student,), (torch.ones(2, 3),), 1.0).backward()
    assert torch.allclose(student.grad, torch.full((2, 3), -2 / 6))
    with pytest.raises(ValueError, match=r"outputs\[1\] has shape"):
        task.distill(a, [a[0], a[0]], 1.0)


def test_teacher_outputs_are_raw_train_mode_tensors_without_touching_the_teacher():
    torch.manual_seed(0)
    teacher = FakeDetector("decoded", "yolo").eval()
    stats = teacher.bn.running_mean.clone()
    outputs = Detection(C).teacher_outputs(teacher, torch.rand(2, 3, 8, 8))
    assert isinstance(outputs, list) and [o.shape for o in outputs] == [(2, 4, 8, 8), (2, 4, 4, 4)]
    assert not outputs[0].requires_grad
    assert torch.equal(teacher.bn.running_mean, stats)  # running statistics used, not updated
    assert not any(m.training for m in teacher.modules())  # modes restored


def test_protected_modules_come_from_the_model():
    assert Detection(C).protected(WrapperLikeDDP(FakeDetector(None, "yolo"))) == ["conv"]


# ---------------------------------------------------------------------------------------------- parity
def test_compare_passes_equal_outputs_and_flags_a_planted_difference():
    rng = np.random.default_rng(0)
    boxes, scores = rng.uniform(0, 160, (4, 30, 4)), rng.uniform(0, 1, (4, 30, C))
    same = compare([boxes, scores], [boxes.copy(), scores.copy()])
    assert same["max_abs_diff"] == 0.0 and same["top1_agreement"] is None and same["samples"] == 4
    assert check(same, VerifyConfig(), "ONNX model.onnx")["passed"]
    planted = boxes.copy()
    planted[2, 7, 1] += 0.5  # 0.5 px on a ~160 px scale: relative 3e-3
    result = Detection(C).compare([boxes, scores], [planted, scores])
    assert result["relative_diff"] > 1e-3 and result["max_abs_diff"] == pytest.approx(0.5)
    assert result["max_abs_reference"] == pytest.approx(np.abs(boxes).max())
    assert [o["max_abs_diff"] for o in result["outputs"]] == [pytest.approx(0.5), 0.0]
    with pytest.raises(ParityError, match="no top-1 agreement"):
        check(result, VerifyConfig(), "ONNX model.onnx")


def test_compare_refuses_shape_and_count_mismatches():
    a = np.zeros((2, 7, 30), dtype=np.float32)
    with pytest.raises(ParityError, match=r"output 0 shapes differ: PyTorch \(2, 7, 30\) vs export \(2, 7, 29\)"):
        compare([a], [a[:, :, :29]])
    with pytest.raises(ParityError, match="the export has 2 outputs, the PyTorch model 1"):
        compare([a], [a, a])
