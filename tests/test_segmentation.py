"""The segmentation task (mIoU, pixel accuracy, loss, distillation) and torchvision segmenters as compressor models
(one logits tensor, protected class convolutions, pruning, checkpoints, ONNX with dynamic H and W)."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from compressor.errors import DataError, ModelLoadError
from compressor.extras import MissingExtra
from compressor.models.config import ModelConfig
from compressor.models.loading import build_arch, load_model
from compressor.models.segmenters import SegmentationLogits, build_torchvision_segmenter, wrap_segmenter
from compressor.tasks import build_task
from compressor.tasks.segmentation import Segmentation

C = 4
# a 2 x 4 mask with classes 0..2 (class 3 occurs nowhere) and a prediction that is right on 6 of its 8 pixels
TARGET = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 2]]])
PRED = torch.tensor([[[0, 1, 1, 1], [0, 2, 2, 0]]])
# by hand: class 0: I = 2 ((0,0), (1,0)), U = 4 -> 1/2; class 1: I = 2, U = 3; class 2: I = 2, U = 3
PARTIAL_MIOU = 100 * (1 / 2 + 2 / 3 + 2 / 3) / 3  # 61.11; counting absent class 3 as 0 would give 45.83


def logits_for(labels: torch.Tensor, classes: int = C) -> torch.Tensor:
    """(N, classes, H, W) logits whose argmax is `labels` (N, H, W)."""
    return 5.0 * F.one_hot(labels, classes).permute(0, 3, 1, 2).float()


def scores(pairs, task=None) -> dict:
    evaluator = (task or Segmentation(C)).evaluator()
    for pred, target in pairs:
        evaluator.update(logits_for(pred), target)
    return evaluator.compute()


# ---------------------------------------------------------------------------------------------- metrics
def test_perfect_prediction_is_100():
    assert scores([(TARGET, TARGET)]) == {"miou": 100.0, "pixel_acc": 100.0, "count": 1}


def test_partial_prediction_matches_the_hand_computed_iou():
    result = scores([(PRED, TARGET)])
    assert result["miou"] == pytest.approx(PARTIAL_MIOU)  # class 3, absent from masks and predictions, not counted
    assert result["pixel_acc"] == pytest.approx(75.0)
    assert result["count"] == 1


def test_a_class_only_predicted_counts_with_iou_zero():
    pred = PRED.clone()
    pred[0, 1, 3] = 3  # class 3 predicted once, never in the mask: class 0 rises to 2/3, class 3 is 0
    assert scores([(pred, TARGET)])["miou"] == pytest.approx(100 * (3 * 2 / 3 + 0) / 4)


def test_ignore_index_pixels_do_not_count():
    target = torch.cat([TARGET, torch.full((1, 2, 3), 255)], dim=2)  # three more columns, all ignored
    pred = torch.cat([PRED, torch.full((1, 2, 3), 3)], dim=2)  # predicted as class 3 (absent elsewhere)
    result = scores([(pred, target)])
    assert result["miou"] == pytest.approx(PARTIAL_MIOU)
    assert result["pixel_acc"] == pytest.approx(75.0)
    other = Segmentation(C, ignore_index=0)  # another ignore_index: class 0 pixels drop out, class 0 too
    kept = scores([(PRED, TARGET)], other)
    assert kept["miou"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # class 1: I 2 / U 2; class 2: I 2 / U 3
    assert kept["pixel_acc"] == pytest.approx(100 * 4 / 5)


def test_logits_of_another_size_are_resized_to_the_mask():
    big = TARGET.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (1, 8, 16)
    assert scores([(TARGET, TARGET)]) == scores([(big, big)])
    halves = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])  # one straight boundary: bilinear keeps it exactly
    evaluator = Segmentation(C).evaluator()
    evaluator.update(logits_for(halves), halves.repeat_interleave(4, 1).repeat_interleave(4, 2))  # 2x4 vs 8x16
    assert evaluator.compute() == {"miou": 100.0, "pixel_acc": 100.0, "count": 1}


def test_gathered_ranks_equal_one_evaluator_fed_everything():
    batch_a = (PRED, TARGET)
    batch_b = (torch.tensor([[[3, 3, 3, 0], [1, 1, 0, 0]]]), torch.tensor([[[3, 3, 0, 0], [1, 1, 1, 0]]]))
    a, b = Segmentation(C).evaluator(), Segmentation(C).evaluator()
    a.update(logits_for(batch_a[0]), batch_a[1])
    b.update(logits_for(batch_b[0]), batch_b[1])
    sent = []
    b.compute(lambda own: sent.append(own) or [own])  # rank 1's state, as all_gather would pass it on
    gathered = a.compute(lambda own: [own, sent[0]])
    whole = scores([batch_a, batch_b])
    assert gathered == pytest.approx(whole)
    assert gathered["count"] == 2
    mean_of_ranks = (a.compute()["miou"] + b.compute()["miou"]) / 2
    assert abs(gathered["miou"] - mean_of_ranks) > 1  # the confusion matrices are summed, not the mIoUs averaged


def test_an_empty_evaluation_reports_zeros():
    assert Segmentation(C).evaluator().compute() == {"miou": 0.0, "pixel_acc": 0.0, "count": 0}


def test_a_user_metric_is_averaged_over_images():
    evaluator = Segmentation(C).evaluator(metric=lambda out, masks: float(masks.float().mean()))
    evaluator.update(logits_for(TARGET), TARGET)
    evaluator.update(logits_for(torch.zeros(3, 2, 4, dtype=torch.long)), torch.zeros(3, 2, 4, dtype=torch.long))
    assert evaluator.compute()["metric"] == pytest.approx(float(TARGET.float().mean()) / 4)


def test_masks_outside_the_classes_are_a_data_error():
    with pytest.raises(DataError, match=r"class id 7, but the segmentation task has 4 classes \(0..3\)"):
        scores([(TARGET, torch.full((1, 2, 4), 7))])
    with pytest.raises(DataError, match="integer masks"):
        Segmentation(C).evaluator().update(logits_for(TARGET), TARGET.float())


def test_missing_torchmetrics_names_the_seg_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.classification", None)
    with pytest.raises(MissingExtra, match="mIoU needs torchmetrics") as info:
        Segmentation(C).evaluator()
    assert "[seg]" in info.value.hint


def test_task_registration_summary_and_export_axes():
    task = build_task("segmentation", C, ignore_index=0)
    assert isinstance(task, Segmentation) and task.ignore_index == 0
    assert (task.primary, task.primary_label, task.primary_unit) == ("miou", "mIoU", "%")
    assert task.summary({"miou": 61.111, "pixel_acc": 75.0, "count": 1}) == "mIoU 61.11%, pixel accuracy 75.00%"


# ---------------------------------------------------------------------------------------------- loss, distillation
def test_loss_ignores_ignore_index_pixels():
    torch.manual_seed(0)
    task = Segmentation(C)
    logits = torch.randn(2, C, 6, 6)
    masks = torch.randint(0, C, (2, 6, 6))
    masks[:, :2] = 255
    loss = task.criterion(logits, masks)
    valid = masks != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], masks[valid])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, C, 2, 6) * 10  # only the ignored pixels
    assert task.criterion(changed, masks).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[:, :, 3] += torch.randn(2, C, 6)  # a counted row
    assert task.criterion(changed, masks).item() != pytest.approx(loss.item(), rel=1e-6)


def test_loss_with_every_pixel_ignored_is_zero_and_differentiable():
    logits = torch.randn(1, C, 4, 4, requires_grad=True)
    loss = Segmentation(C).criterion(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_loss_upsamples_logits_to_the_masks():
    torch.manual_seed(0)
    logits, masks = torch.randn(2, C, 4, 4), torch.randint(0, C, (2, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert Segmentation(C).criterion(logits, masks).item() == pytest.approx(F.cross_entropy(up, masks).item())


def test_distill_is_a_per_pixel_kl():
    torch.manual_seed(0)
    task = Segmentation(C)
    student, teacher = torch.randn(2, C, 5, 5), torch.randn(2, C, 5, 5)
    assert task.distill(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p = F.softmax(teacher / t, 1)
    by_hand = (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert task.distill(student, teacher, t).item() == pytest.approx(by_hand.item(), rel=1e-5)
    masks = torch.randint(0, C, (2, 5, 5))
    masks[:, :, :2] = 255
    changed = student.clone()
    changed[..., :2] = 0.0
    assert task.distill(changed, teacher, t, targets=masks).item() == pytest.approx(
        task.distill(student, teacher, t, targets=masks).item(), rel=1e-6)  # ignored pixels do not count


# ---------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def lraspp() -> SegmentationLogits:
    return build_torchvision_segmenter("lraspp_mobilenet_v3_large", C, 3).eval()


def test_the_wrapper_returns_logits_at_input_resolution(lraspp):
    with torch.no_grad():
        out = lraspp(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, C, 64, 64)
    one_channel = build_arch("torchvision:lraspp_mobilenet_v3_large", C, 1).eval()
    with torch.no_grad():
        assert one_channel(torch.randn(1, 1, 64, 80)).shape == (1, C, 64, 80)


def test_the_wrapper_keeps_torchvision_names_and_drops_the_aux_head():
    dense = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                        num_classes=C).eval()
    wrapped = copy.deepcopy(dense)
    wrapped = wrap_segmenter(wrapped)
    assert list(wrapped.state_dict()) == list(dense.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(wrapped(x), dense(x)["out"])
    with_aux = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=C,
                                                            aux_loss=True)
    assert with_aux.aux_classifier is not None
    assert wrap_segmenter(with_aux).aux_classifier is None
    assert not any(k.startswith("aux_classifier") for k in wrap_segmenter(with_aux).state_dict())
    with pytest.raises(ModelLoadError, match="is not a torchvision segmentation model"):
        wrap_segmenter(torch.nn.Conv2d(3, C, 1))


@pytest.mark.parametrize("name, protected", [
    ("lraspp_mobilenet_v3_large", ["classifier.low_classifier", "classifier.high_classifier"]),
    ("deeplabv3_mobilenet_v3_large", ["classifier.4"]),
])
def test_the_class_convolutions_are_protected(name, protected):
    model = build_torchvision_segmenter(name, C, 3)
    assert model.protected_modules() == protected
    assert Segmentation(C).protected(model) == protected
    assert all(model.get_submodule(p).out_channels == C for p in protected)
    assert model.training  # the probe forward left the mode as it was
    assert Segmentation(C).protected(torch.nn.Conv2d(3, C, 1)) == []


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_pruning_30_percent_of_channels_keeps_the_model_working(name):
    from compressor.prune.importance import ImportanceConfig, build_scorer
    from compressor.prune.planning import Constraints, plan_for_channels
    from compressor.prune.removal import remove
    from compressor.prune.snapshot import snapshot

    model = build_torchvision_segmenter(name, C, 3)
    example = torch.randn(1, 3, 64, 64)
    params = sum(p.numel() for p in model.parameters())
    protected = model.protected_modules()
    snap = snapshot(model, example, protected, build_scorer(ImportanceConfig(kind="magnitude")))
    assert not any(c.root in protected for c in snap.candidates)
    width = sum(c.width for c in snap.candidates)
    removed = remove(model, example, plan_for_channels(snap, 0.3, Constraints()))
    assert removed == pytest.approx(0.3 * width, abs=width * 0.01)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * params
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 80)).shape == (2, C, 64, 80)
    assert model.protected_modules() == protected
    assert all(model.get_submodule(p).out_channels == C for p in protected)


def test_checkpoints_of_torchvision_segmenters_load(tmp_path, lraspp):
    cfg = ModelConfig(arch="torchvision:lraspp_mobilenet_v3_large", num_classes=C, input_shape=[3, 64, 64])
    dense = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                        num_classes=C).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = dense(x)["out"]
    torch.save(dense.state_dict(), tmp_path / "weights.pt")  # torchvision's own keys
    torch.save(dense, tmp_path / "model.pt")  # a pickled torchvision segmenter: its forward returns a dict
    for path, trust in (("weights.pt", False), ("model.pt", True)):
        model = load_model(tmp_path / path, cfg, trust_checkpoint=trust)
        assert isinstance(model, SegmentationLogits)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected)


def test_onnx_export_with_dynamic_height_and_width_matches_pytorch(tmp_path, lraspp):
    import onnxruntime as ort

    from compressor.deploy.config import OnnxConfig
    from compressor.deploy.export import export_onnx

    path = tmp_path / "lraspp.onnx"
    export_onnx(lraspp, torch.randn(1, 3, 64, 64), path, OnnxConfig())  # the wrapper's dynamic_size: any H, W
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 64, 64), (2, 3, 96, 80)):
        x = torch.randn(*shape)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = lraspp(x).numpy()
        assert got.shape == (shape[0], C, *shape[2:])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
