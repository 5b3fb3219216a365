"""int8 for detectors: the nodes after the last weight layers stay in float (deploy/quantize.float_tail), and a
quantized detector is judged on its detections (tasks/detection.reduced_compare), not on the box regression of
anchors no detection comes from."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor.deploy.config import OnnxConfig, VerifyConfig
from compressor.deploy.export import export_onnx
from compressor.deploy.quantize import Int8Quantizer, float_tail, int8_settings
from compressor.deploy.verify import check
from compressor.errors import ParityError
from compressor.tasks.detection import REDUCED_CONF, reduced_compare

SIZE, CLASSES = 32, 3
PIXELS = 640  # the box scale of a 640-px detector (Ultralytics' default input); the test's input stays small


class YoloLike(nn.Module):
    """A one-scale 'yolo' layout head: (N, 4 + C, A) of boxes in input pixels (cx, cy, w, h) beside class
    probabilities, as Ultralytics' Detect concatenates them; one class is confident on every anchor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, CLASSES, 1)
        with torch.no_grad():
            self.box.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
            self.cls.weight.mul_(4.0)  # class logits spread over a few units: the best class varies by anchor

    def forward(self, x):
        f = self.body(x)
        boxes = torch.sigmoid(self.box(f)).flatten(2) * PIXELS  # pixels
        probs = torch.sigmoid(self.cls(f)).flatten(2)
        return torch.cat([boxes, probs], 1)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    work = tmp_path_factory.mktemp("qtail")
    model = YoloLike().eval()
    export_onnx(model, torch.rand(1, 3, SIZE, SIZE), work / "model.onnx", OnnxConfig())
    g = torch.Generator().manual_seed(1)
    samples = torch.rand(32, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        reference = model(samples).numpy()
    return {"path": work / "model.onnx", "work": work, "samples": samples.numpy(), "reference": reference,
            "calibration": torch.rand(32, 3, SIZE, SIZE, generator=g).numpy()}


def run(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_float_tail_is_every_node_after_the_last_weight_layers(head):
    model = onnx.load(str(head["path"]))
    tail = float_tail(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert tail and {ops[n] for n in tail} >= {"Sigmoid", "Concat"}  # the decode: sigmoids, flatten, concat, scale
    assert not {ops[n] for n in tail} & {"Conv", "Gemm", "MatMul"}
    body = [n.name for n in model.graph.node if n.op_type == "Relu"]
    assert body and not set(body) & set(tail)  # activations between convolutions are not the tail


def test_int8_with_the_tail_in_float_keeps_the_classes_and_without_it_does_not(head, monkeypatch):
    """One int8 scale over pixels and probabilities rounds the probabilities away; the float tail keeps them."""
    settings = int8_settings("auto", "auto", gpu=False)
    quantizer = Int8Quantizer(head["path"], head["calibration"], "minmax", True, settings)
    try:
        kept = quantizer.quantize(head["work"] / "tail.int8.onnx")
        assert kept["float_tail"] == len(quantizer.tail) > 0
        quantizer.tail = []
        quantizer.quantize(head["work"] / "all.int8.onnx")
    finally:
        quantizer.close()
    good = reduced_compare([head["reference"]], run(head["work"] / "tail.int8.onnx", head["samples"]))
    bad = reduced_compare([head["reference"]], run(head["work"] / "all.int8.onnx", head["samples"]))
    assert good["confident_anchors"] == bad["confident_anchors"] > 0
    assert good["top1_agreement"] >= 0.97 and good["score_abs_diff"] < 0.05, good
    assert bad["score_abs_diff"] > 0.5 and bad["top1_agreement"] < 0.9, bad
    cfg = VerifyConfig()
    assert check(good, cfg, "int8", precision="int8", atol=0.0, rtol=cfg.int8_rtol)["passed"]


def test_reduced_compare_ignores_background_boxes_but_not_detections():
    rng = np.random.default_rng(0)
    n, anchors = 2, 50
    ref = np.zeros((n, 4 + CLASSES, anchors), np.float32)
    ref[:, :4] = rng.uniform(4, 28, (n, 4, anchors))
    ref[:, 4:] = rng.uniform(0.0, 0.1, (n, CLASSES, anchors))
    ref[:, 4, :10] = 0.9  # ten confident anchors of class 0 per image
    cand = ref.copy()
    cand[:, :4, 30] += 20.0  # a background anchor's box moves by most of the image
    moved = reduced_compare([ref], [cand])
    assert moved["box_relative_diff"] == 0.0 and moved["top1_agreement"] == 1.0
    assert moved["confident_anchors"] == 2 * 10 and moved["confidence"] == REDUCED_CONF
    cand[:, :2, 3] += 14.0  # a detection's box moves by half the image
    cx, cy, w, h = ref[:, 0, :10], ref[:, 1, :10], ref[:, 2, :10], ref[:, 3, :10]
    scale = np.abs(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])).max()  # the largest xyxy coordinate
    assert reduced_compare([ref], [cand])["box_relative_diff"] == pytest.approx(14.0 / scale, rel=1e-5)
    cfg = VerifyConfig()
    with pytest.raises(ParityError, match="disagrees"):
        check(reduced_compare([ref], [cand]), cfg, "int8", precision="int8", atol=0.0, rtol=cfg.int8_rtol)
    flipped = ref.copy()
    flipped[:, 5, :10] = 0.95  # class 1 now wins on every confident anchor
    assert reduced_compare([ref], [flipped])["top1_agreement"] == 0.0


def test_boxes_scores_layout_and_an_untrained_detector():
    """Two outputs are torchvision's (boxes, scores) layout; no confident anchor leaves only the scores checked."""
    boxes = np.tile(np.array([[2.0, 2.0, 10.0, 10.0]], np.float32), (1, 6, 1))
    scores = np.full((1, 6, CLASSES), 0.01, np.float32)
    result = reduced_compare([boxes, scores], [boxes + 50.0, scores + 0.02])
    assert result["confident_anchors"] == 0 and result["top1_agreement"] is None
    assert result["max_abs_diff"] == pytest.approx(0.02, abs=1e-6)

