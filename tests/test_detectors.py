"""torchvision detectors as compressor models (compressor/models/detectors*.py): the eval outputs are torchvision's
own detections before NMS, the loss is torchvision's, the anchors follow the input size, the predictors are
protected, and a pruned detector still trains, reloads and exports with ONNX Runtime parity. SSDlite is checked in
full; RetinaNet (v1, v2) and FCOS (ResNet-50 FPN, expensive on a CPU) at 64x64, the least their five levels take,
for torchvision's outputs and loss, and FCOS pruned and exported; SSD300-VGG16 (24M parameters, at least 268
pixels) for its size limit."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from compressor.errors import DataError, ModelLoadError
from compressor.models.loading import build_arch
from compressor.tasks.targets import BoxTargets

SSDLITE = "torchvision:ssdlite320_mobilenet_v3_large"
SIZE, CLASSES = 128, 4


def ssdlite(in_channels: int = 3, size: int = SIZE) -> nn.Module:
    """SSDlite with batch-norm statistics of random images: torchvision's initialisation (normal, std 0.03) with
    fresh statistics leaves the head's inputs near zero, so every image would get the same outputs."""
    model = build_arch(SSDLITE, CLASSES, in_channels)
    calibrate(model, in_channels, size)
    return model


def calibrate(model: nn.Module, in_channels: int, size: int) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # the plain average of what it sees
    with torch.no_grad():
        model.train()(torch.rand(4, in_channels, size, size, generator=torch.Generator().manual_seed(1)))
    model.eval()


def anchor_count(size: int) -> int:
    """SSDlite's anchors: 6 per cell on its 6 maps (strides 16, 32, then four stride-2 levels, sizes rounded up)."""
    cells, side = 0, -(-size // 16)
    for _ in range(6):
        cells += side * side
        side = -(-side // 2)
    return 6 * cells


def box_targets() -> BoxTargets:
    """Two images: one box of class 1; two boxes of classes 0 and 2."""
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 70.0]]),
             torch.tensor([[30.0, 30.0, 100.0, 90.0], [0.0, 0.0, 24.0, 20.0]])]
    return BoxTargets(boxes, [torch.tensor([1]), torch.tensor([0, 2])], (SIZE, SIZE))


def images(batch: int = 2, size: int = SIZE, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- outputs


def test_eval_outputs_are_decoded_boxes_and_class_probabilities():
    model = ssdlite()
    assert model.output_layout == "boxes_scores" and model.num_classes == CLASSES
    with torch.no_grad():
        boxes, scores = model(images())
    count = anchor_count(SIZE)
    assert count == 522 and boxes.shape == (2, count, 4) and scores.shape == (2, count, CLASSES)
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= SIZE  # input pixels, clipped to the image
    assert bool((boxes[..., 2:] >= boxes[..., :2]).all())
    assert float(boxes.max()) > SIZE / 2  # pixels, not fractions of the image
    assert float(scores.min()) >= 0 and float(scores.sum(-1).max()) < 1  # the background's share is left out
    assert float((scores[0] - scores[1]).abs().max()) > 1e-3  # the outputs depend on the image


def test_eval_outputs_hold_torchvision_own_detections():
    """torchvision's SSD (its transform set to this size, so it does not resize) keeps, after its score threshold
    and NMS, a subset of the wrapper's (box, class score) pairs: same decoding, same clipping, same softmax."""
    model = ssdlite()
    x = images()
    transform = model.detector.transform
    transform.fixed_size, transform.min_size, transform.max_size = (SIZE, SIZE), (SIZE,), SIZE
    with torch.no_grad():
        boxes, scores = model(x)
        reference = model.detector(list(x))
    for i, detections in enumerate(reference):
        assert len(detections["boxes"]) == 300  # torchvision's detections_per_img for SSDlite
        for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"]):
            error = (boxes[i] - box).abs().max(-1).values + (scores[i, :, label - 1] - score).abs()
            assert float(error.min()) < 1e-4


@pytest.mark.parametrize("size", [160, 320])
def test_anchors_follow_the_input_size(size):
    model = build_arch(SSDLITE, CLASSES, 3).eval()
    with torch.no_grad():
        boxes, scores = model(torch.rand(1, 3, size, size))
    count = anchor_count(size)
    assert boxes.shape == (1, count, 4) and scores.shape == (1, count, CLASSES)
    assert model.anchors.shape == (count, 4) and model.anchor_key[0] == (size, size)
    assert "anchors" not in model.state_dict()  # a buffer recomputed from the size, never saved
    centres = (model.anchors[:, :2] + model.anchors[:, 2:]) / 2
    assert float(centres.min()) > 0 and float(centres.max()) < size


def test_set_input_size_computes_the_anchors_without_touching_the_statistics():
    model = build_arch(SSDLITE, CLASSES, 3).train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.set_input_size(160, 128)
    assert model.anchor_key[0] == (160, 128) and model.training
    assert torch.equal(bn.running_mean, before)
    anchors = model.anchors.clone()
    model.eval()(torch.rand(2, 3, 160, 128))
    assert model.anchors is not anchors and torch.equal(model.anchors, anchors)  # same size: the same anchors


def test_ssd300_refuses_a_size_its_backbone_cannot_take():
    model = build_arch("torchvision:ssd300_vgg16", CLASSES, 3)
    with pytest.raises(ModelLoadError, match=r"ssd300_vgg16 cannot run on 267x267 inputs .*at least 268x268"):
        model.set_input_size(267, 267)
    model.set_input_size(268, 268)
    assert model.anchors.shape == (7034, 4)  # 4 + 6 + 6 + 6 + 4 + 4 anchors per cell on 34, 17, 9, 5, 3, 1
    assert model.protected_modules()[0] == "detector.head.classification_head.module_list.0"


def test_one_channel_input_replaces_the_first_convolution():
    model = ssdlite(in_channels=1)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1 and model.mean.shape == (1, 1, 1, 1)
    assert float(model.mean) == 0.5 and float(model.std) == 0.5  # SSDlite's normalisation: x * 2 - 1
    boxes, scores = model(images(channels=1))
    assert boxes.shape == (2, 522, 4) and scores.shape == (2, 522, CLASSES)


# ---------------------------------------------------------------------------------------------- training


def test_loss_is_torchvision_own_loss():
    model = ssdlite()
    x, targets = images(), box_targets()
    model.train()
    torch.manual_seed(0)
    loss = model.detection_loss(model(x), targets)
    shifted = [{"boxes": b, "labels": c + 1} for b, c in zip(targets.boxes, targets.labels)]
    transform = model.detector.transform
    transform.fixed_size, transform.min_size, transform.max_size = (SIZE, SIZE), (SIZE,), SIZE
    reference = model.detector(list(x), shifted)
    assert loss.item() == pytest.approx(sum(reference.values()).item(), rel=1e-5)
    assert set(model.loss_items) == {"box", "cls"} and float(model.loss_items["box"]) > 0


def test_loss_decreases_on_a_fixed_batch_and_backpropagates():
    model = build_arch(SSDLITE, CLASSES, 3).train()
    x, targets = images(), box_targets()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = model.detection_loss(model(x), targets)
        assert loss.ndim == 0 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    head = model.detector.head.classification_head.module_list[0][1]
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0


def test_train_outputs_are_the_raw_head_tensors():
    model = build_arch(SSDLITE, CLASSES, 3).train()
    regression, logits = model(images())
    assert regression.shape == (2, 522, 4) and logits.shape == (2, 522, CLASSES + 1)  # background first


def test_loss_handles_images_without_boxes_and_drops_boxes_without_area():
    model = build_arch(SSDLITE, CLASSES, 3).train()
    targets = BoxTargets([torch.zeros(0, 4), torch.tensor([[5.0, 5.0, 5.0, 40.0], [8.0, 8.0, 50.0, 60.0]])],
                         [torch.zeros(0, dtype=torch.long), torch.tensor([1, 2])], (SIZE, SIZE))
    loss = model.detection_loss(model(images()), targets)
    assert torch.isfinite(loss)
    empty = BoxTargets([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, (SIZE, SIZE))
    assert torch.isfinite(model.detection_loss(model(images()), empty))


def test_a_label_outside_the_classes_is_a_data_error():
    model = build_arch(SSDLITE, CLASSES, 3).train()
    targets = BoxTargets([torch.tensor([[1.0, 1.0, 30.0, 30.0]])] * 2, [torch.tensor([0]), torch.tensor([4])],
                         (SIZE, SIZE))
    with pytest.raises(DataError, match=r"class id 4, outside 0\.\.3 of model\.num_classes 4"):
        model.detection_loss(model(images()), targets)


# ---------------------------------------------------------------------------------------------- pruning, export


def test_protected_modules_are_the_predictors():
    from compressor.prune import graph as dg

    model = ssdlite()
    names = model.protected_modules()
    assert len(names) == 12  # 6 levels, class and box predictors
    modules = dict(model.named_modules())
    assert [modules[n].out_channels for n in names] == [6 * (CLASSES + 1)] * 6 + [6 * 4] * 6  # classes, boxes
    layers = dg.output_layers(model, images(1))  # once: a forward each
    outputs = [n for n, m in model.named_modules() if m in layers]
    assert sorted(outputs) == sorted(names)


def test_pruned_detector_trains_reloads_and_exports_with_parity(tmp_path):
    import onnxruntime as ort

    from compressor.deploy.config import OnnxConfig
    from compressor.deploy.export import export_onnx
    from compressor.models.config import ModelConfig
    from compressor.models.slim import load_slim, save_slim
    from compressor.prune.importance import ImportanceConfig, build_scorer
    from compressor.prune.planning import Constraints, plan_for_channels
    from compressor.prune.removal import remove
    from compressor.prune.snapshot import snapshot

    model = ssdlite()
    example = images(1)
    dense_params = sum(p.numel() for p in model.parameters())
    predictors = {n: m.weight.shape for n, m in model.named_modules() if n in model.protected_modules()}
    snap = snapshot(model, example, [], build_scorer(ImportanceConfig(kind="magnitude")))
    plan = plan_for_channels(snap, 0.3, Constraints())
    total = sum(c.width for c in snap.candidates)
    assert remove(model, example, plan) == pytest.approx(0.3 * total, abs=2)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * dense_params
    modules = dict(model.named_modules())
    assert all(modules[n].weight.shape[0] == shape[0] for n, shape in predictors.items())  # outputs kept
    assert any(modules[n].weight.shape[1] < shape[1] for n, shape in predictors.items())  # inputs narrowed

    model.train()
    regression, logits = model(images())
    assert regression.shape == (2, 522, 4) and logits.shape == (2, 522, CLASSES + 1)
    loss = model.detection_loss((regression, logits), box_targets())
    loss.backward()
    assert torch.isfinite(loss)

    cfg = ModelConfig(arch=SSDLITE, num_classes=CLASSES, in_channels=3, input_shape=[3, SIZE, SIZE])
    calibrate(model, 3, SIZE)
    save_slim(model, tmp_path / "slim", cfg)
    reloaded = load_slim(tmp_path / "slim")
    x = images(3, seed=5)
    with torch.no_grad():
        boxes, scores = model.eval()(x)
        again = reloaded(x)
    assert boxes.shape == (3, 522, 4) and scores.shape == (3, 522, CLASSES)
    assert torch.equal(again[0], boxes) and torch.equal(again[1], scores)

    result = export_onnx(model, example, tmp_path / "model.onnx", OnnxConfig())
    assert result["dynamic_batch"]
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores"]
    got = session.run(None, {"input": x.numpy()})  # batch 3, exported at batch 1
    for reference, out in zip((boxes, scores), got):
        reference = reference.numpy()
        assert out.shape == reference.shape
        assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max()
    assert float((scores[0] - scores[1]).abs().max()) > 1e-3  # per-image outputs: the comparison means something


# ---------------------------------------------------------------------------------------------- RetinaNet, FCOS

FPN_SIZE = 64  # the least their P3-P7 levels take: 8, 4, 2, 1, 1 cells a side
FPN_CELLS = 64 + 16 + 4 + 1 + 1


def fpn_targets() -> BoxTargets:
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 58.0]]), torch.tensor([[30.0, 30.0, 62.0, 60.0], [0.0, 0.0, 24.0, 20.0]])]
    return BoxTargets(boxes, [torch.tensor([1]), torch.tensor([0, 2])], (FPN_SIZE, FPN_SIZE))


@pytest.mark.parametrize("name, per_cell", [("retinanet_resnet50_fpn", 9), ("retinanet_resnet50_fpn_v2", 9),
                                            ("fcos_resnet50_fpn", 1)])
def test_fpn_detectors_are_torchvision_own_outputs_and_loss(name, per_cell):
    """Sigmoid classifiers without a background column: built with C classes, 0-based labels as they are. (A loss
    that decreases in training is SSDlite's test: the wrapper's loss is torchvision's own, checked here.)"""
    model = build_arch(f"torchvision:{name}", CLASSES, 3)
    calibrate(model, 3, FPN_SIZE)
    x, targets = images(size=FPN_SIZE), fpn_targets()
    detector = model.detector
    detector.transform.fixed_size, detector.transform.min_size = (FPN_SIZE, FPN_SIZE), (FPN_SIZE,)
    detector.transform.max_size, detector.score_thresh = FPN_SIZE, 0.0
    with torch.no_grad():
        boxes, scores = model(x)
        reference = detector(list(x))
    count = per_cell * FPN_CELLS
    assert boxes.shape == (2, count, 4) and scores.shape == (2, count, CLASSES)
    assert 0 <= float(scores.min()) and float(scores.max()) <= 1 and float(boxes.max()) <= FPN_SIZE
    for i, detections in enumerate(reference):
        assert len(detections["boxes"]) >= 100
        for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"]):
            error = (boxes[i] - box).abs().max(-1).values + (scores[i, :, label] - score).abs()
            assert float(error.min()) < 1e-4

    model.train()
    loss = model.detection_loss(model(x), targets)
    expected = detector(list(x), [{"boxes": b, "labels": c} for b, c in zip(targets.boxes, targets.labels)])
    assert loss.item() == pytest.approx(sum(expected.values()).item(), rel=1e-5)
    loss.backward()
    modules = dict(model.named_modules())
    for layer in model.protected_modules():  # every predictor (classes, boxes, centre-ness) gets a gradient
        grad = modules[layer].weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, layer


@pytest.mark.parametrize("name", ["fcos_resnet50_fpn"])
def test_pruned_fpn_detector_trains_and_exports_with_parity(name, tmp_path):
    """The class/box/centre-ness predictors are shared by the five levels; pruning narrows the towers (group-normed,
    as RetinaNet v2's), the FPN and the backbone around them. (FCOS only: each ResNet-50 FPN detector costs some
    8 s here, and RetinaNet's heads are the same towers without the centre-ness output.) ONNX Runtime is held to
    PyTorch's own float32 rounding (measured against float64): boxes are decoded against anchors up to 400 pixels,
    so a random network's rounding reaches 1e-2 pixels."""
    import copy

    import onnxruntime as ort

    from compressor.deploy.config import OnnxConfig
    from compressor.deploy.export import export_onnx
    from compressor.prune.importance import ImportanceConfig, build_scorer
    from compressor.prune.planning import Constraints, plan_for_channels
    from compressor.prune.removal import remove
    from compressor.prune.snapshot import snapshot

    model = build_arch(f"torchvision:{name}", CLASSES, 3)
    example = images(1, size=FPN_SIZE)
    names = model.protected_modules()
    modules = dict(model.named_modules())
    predictors = {n: modules[n].out_channels for n in names}
    snap = snapshot(model, example, [], build_scorer(ImportanceConfig(kind="magnitude")))
    total = sum(c.width for c in snap.candidates)
    assert remove(model, example, plan_for_channels(snap, 0.3, Constraints())) == pytest.approx(0.3 * total, abs=2)
    modules = dict(model.named_modules())
    assert {n: modules[n].out_channels for n in names} == predictors
    assert all(modules[n].in_channels < 256 for n in names)

    model.train()
    outputs = model(images(size=FPN_SIZE))
    assert [tuple(o.shape[:2]) for o in outputs] == [(2, predictors[names[0]] // CLASSES * FPN_CELLS)] * len(outputs)
    loss = model.detection_loss(outputs, fpn_targets())
    loss.backward()
    assert torch.isfinite(loss)

    calibrate(model, 3, FPN_SIZE)
    result = export_onnx(model, example, tmp_path / "model.onnx", OnnxConfig())
    session = ort.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    x = images(3, size=FPN_SIZE, seed=5)
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        reference = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    for ours, out, truth in zip(reference, got, exact):
        own = float((ours.double() - truth).abs().max())  # PyTorch's own rounding
        assert out.shape == tuple(ours.shape)
        assert np.abs(out - ours.numpy()).max() <= 4 * own + 1e-5 * float(ours.abs().max())
    assert float((reference[1][0] - reference[1][1]).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------- names


SUPPORTED = ("torchvision:ssdlite320_mobilenet_v3_large, torchvision:ssd300_vgg16, "
             "torchvision:retinanet_resnet50_fpn, torchvision:retinanet_resnet50_fpn_v2, torchvision:fcos_resnet50_fpn")


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn"])
def test_unsupported_detectors_name_the_supported_ones(name):
    with pytest.raises(ModelLoadError) as info:
        build_arch(f"torchvision:{name}", CLASSES, 3)
    assert f"torchvision:{name} is a torchvision detector compressor does not wrap; supported detectors: " \
           f"{SUPPORTED}." in str(info.value)
    assert "run NMS on their proposals inside the network" in str(info.value)


def test_unknown_detector_name_and_bad_class_count():
    from compressor.models.detectors import build_torchvision_detector

    with pytest.raises(ModelLoadError, match=f"ssdlite_tiny is a .* supported detectors: {re.escape(SUPPORTED)}"):
        build_torchvision_detector("ssdlite_tiny", CLASSES, 3)
    with pytest.raises(ModelLoadError, match="needs model.num_classes >= 1"):
        build_torchvision_detector("ssdlite320_mobilenet_v3_large", 0, 3)
