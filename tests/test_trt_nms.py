"""The TensorRT file with NMS by EfficientNMS_TRT (compressor/deploy/trt_nms.py): on the CPU, the graph of both raw
layouts holds exactly one plugin node with the documented attributes and the recipe's values, its inputs are the
decoded boxes and one-class scores (run up to the plugin in ONNX Runtime and compared with boxes_and_scores of the raw
outputs), its outputs are typed as the plugin documents; settings the plugin cannot take are refused; the plugin
library is registered once; compress's engine stage reports why no engine was built. On a GPU (`gpu` mark): engines
built from the hand-made heads give exactly the expected detections, and YOLO11n's engine passes the parity rule."""
from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is first imported: no connectivity probe

from compressor.deploy import tensorrt_runtime  # noqa: E402
from compressor.deploy.nms_graph import OUTPUTS, add_nms  # noqa: E402
from compressor.deploy.onnx_runtime import create_session  # noqa: E402
from compressor.deploy.tensorrt_runtime import register_plugins, tensorrt_missing  # noqa: E402
from compressor.deploy.trt_compat import check_onnx  # noqa: E402
from compressor.deploy.trt_nms import (DENSE_CONF, DOMAIN, ENGINE_FILE, ONNX_FILE, PLUGIN,  # noqa: E402
                                       add_efficient_nms)
from compressor.errors import BackendUnavailable, ExportError  # noqa: E402
from compressor.tasks.boxes import boxes_and_scores  # noqa: E402
from tests.test_nms_export import (ANCHORS, CLASSES, EXPECTED, SIZE, encode, fake_detector,  # noqa: E402,F401
                                   layout_inputs, yolo)

NO_GPU = bool(tensorrt_missing())
RECIPE_NMS = {"conf": 0.3, "iou": 0.6, "max_det": 5}  # values a test can tell from the plugin's defaults


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == PLUGIN]


# ---------------------------------------------------------------------------------------------- the graph
@pytest.mark.parametrize("layout", ["yolo", "boxes_scores"])
def test_graph_holds_one_plugin_node_with_the_documented_attributes(tmp_path, layout):
    source = fake_detector(tmp_path / "model.onnx", layout)
    info = add_efficient_nms(source, tmp_path / ONNX_FILE, layout=layout, **RECIPE_NMS)
    model = onnx.load(str(tmp_path / ONNX_FILE))
    onnx.checker.check_model(model, full_check=True)  # the custom domain is registered, so the file is valid ONNX
    nodes = plugin_nodes(model)
    assert len(nodes) == 1 and not [n for n in model.graph.node if n.op_type == "NonMaxSuppression"]
    node = nodes[0]
    assert node.domain == DOMAIN and (DOMAIN, 1) in [(o.domain, o.version) for o in model.opset_import]
    attrs = {a.name: (a.type, helper.get_attribute_value(a)) for a in node.attribute}
    assert attrs == {
        "score_threshold": (onnx.AttributeProto.FLOAT, pytest.approx(0.3)),
        "iou_threshold": (onnx.AttributeProto.FLOAT, pytest.approx(0.6)),
        "max_output_boxes": (onnx.AttributeProto.INT, 5),
        "background_class": (onnx.AttributeProto.INT, -1),
        "score_activation": (onnx.AttributeProto.INT, 0),
        "class_agnostic": (onnx.AttributeProto.INT, 0),
        "box_coding": (onnx.AttributeProto.INT, 0),
        "plugin_version": (onnx.AttributeProto.STRING, b"1"),
    }
    # its outputs are the graph's, named as model.nms.onnx names them and typed / shaped as the plugin writes them
    assert list(node.output) == list(OUTPUTS) == [o.name for o in model.graph.output] == info["outputs"]
    types = [(o.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
             for o in model.graph.output]
    assert types == [(TensorProto.INT32, ["batch", 1]), (TensorProto.FLOAT, ["batch", 5, 4]),
                     (TensorProto.FLOAT, ["batch", 5]), (TensorProto.INT32, ["batch", 5])]
    assert [i.name for i in model.graph.input] == ["input"] and info["plugin"] == PLUGIN and info["max_det"] == 5
    with pytest.raises(Exception, match="EfficientNMS_TRT|trt.plugins"):  # a TensorRT-only file
        create_session(tmp_path / ONNX_FILE, "ort-cpu")
    # every other node is an op TensorRT's ONNX parser supports (compressor's static table): the plugin is the one
    # thing the parser takes from the plugin registry
    findings = check_onnx(tmp_path / ONNX_FILE).findings
    assert [(f.op, f.domain, f.level) for f in findings] == [(PLUGIN, DOMAIN, "unsupported")]


def random_head(layout: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded raw heads (yolo layout (N, 4 + C, A)) with boxes reaching past the image and one anchor per image whose
    two best probabilities tie; the input images encoding them in `layout` (as test_nms_export.layout_inputs)."""
    rng = np.random.default_rng(seed)
    raw = np.concatenate([rng.uniform(-10, SIZE + 10, (n, 2, ANCHORS)), rng.uniform(1, 40, (n, 2, ANCHORS)),
                          rng.uniform(0, 1, (n, CLASSES, ANCHORS))], axis=1).astype(np.float32)
    raw[:, 4:, 0] = [0.5, 0.9, 0.9]  # anchor 0's two best tie: the first best class (1) is its label
    if layout == "yolo":
        return raw, encode([raw])
    pred = raw.transpose(0, 2, 1)
    cx, cy, w, h = (pred[..., i] for i in range(4))
    return raw, encode([np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1), pred[..., 4:]])


@pytest.mark.parametrize("layout", ["yolo", "boxes_scores"])
def test_plugin_inputs_are_the_decoded_boxes_and_one_class_scores(tmp_path, layout):
    source = fake_detector(tmp_path / "model.onnx", layout)
    add_efficient_nms(source, tmp_path / ONNX_FILE, layout=layout, **RECIPE_NMS)
    model = onnx.load(str(tmp_path / ONNX_FILE))
    node = plugin_nodes(model)[0]
    assert len(node.input) == 2  # Standard NMS Mode: boxes and scores, no anchors
    # a copy that stops before the plugin, the plugin's two inputs as its outputs (ONNX Runtime can run that)
    model.graph.node.remove(node)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.input)
    onnx.save(model, str(tmp_path / "decode.onnx"))

    _, images = random_head(layout, 3, seed=0)
    boxes, scores = create_session(tmp_path / "decode.onnx").run(None, {"input": images})
    assert boxes.shape == (3, ANCHORS, 4) and scores.shape == (3, ANCHORS, CLASSES)  # [batch, boxes, 4 / classes]

    raw = create_session(source).run(None, {"input": images})
    want_boxes, want_scores = boxes_and_scores([torch.from_numpy(r) for r in raw], layout)
    limits = torch.tensor([SIZE, SIZE, SIZE, SIZE], dtype=torch.float32)  # x to [0, W], y to [0, H]
    np.testing.assert_allclose(boxes, torch.minimum(want_boxes.clamp(min=0), limits).numpy(), atol=1e-5)
    assert (boxes.min() == 0.0) and (boxes.max() == SIZE)  # the random boxes do reach past the image
    label = want_scores.argmax(-1, keepdim=True)  # torch's first best class
    best = torch.zeros_like(want_scores, dtype=torch.bool).scatter_(-1, label, True)
    np.testing.assert_allclose(scores, torch.where(best, want_scores, torch.tensor(-1.0)).numpy(), atol=1e-6)
    assert (scores[:, 0] > -1).sum(-1).tolist() == [1, 1, 1] and (scores[:, 0, 1] == 0.9).all()  # tie: class 1


def test_settings_the_plugin_cannot_take_are_refused(tmp_path):
    source = fake_detector(tmp_path / "model.onnx", "yolo")
    with pytest.raises(ExportError, match=f"below {DENSE_CONF}.*dense kernel"):
        add_efficient_nms(source, tmp_path / ONNX_FILE, layout="yolo", conf=0.001, iou=0.5, max_det=3)
    with pytest.raises(ExportError, match="IoU threshold above 0"):
        add_efficient_nms(source, tmp_path / ONNX_FILE, layout="yolo", conf=0.25, iou=0.0, max_det=3)
    with pytest.raises(ExportError, match="2 raw outputs"):
        add_efficient_nms(source, tmp_path / ONNX_FILE, layout="boxes_scores", conf=0.25, iou=0.5, max_det=3)
    add_nms(source, tmp_path / "model.nms.onnx", layout="yolo", conf=0.25, iou=0.5, max_det=3)
    with pytest.raises(ExportError, match="post-processed before"):
        add_efficient_nms(tmp_path / "model.nms.onnx", tmp_path / ONNX_FILE, layout="yolo", conf=0.25, iou=0.5,
                          max_det=3)
    assert not (tmp_path / ONNX_FILE).exists()


# ---------------------------------------------------------------------------------------------- the plugin library
def fake_trt(result: bool, calls: list) -> SimpleNamespace:
    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    def init_libnvinfer_plugins(logger, namespace):
        calls.append((logger, namespace))
        return result

    return SimpleNamespace(Logger=Logger, init_libnvinfer_plugins=init_libnvinfer_plugins)


def test_plugin_library_is_registered_once_with_the_default_namespace(monkeypatch):
    monkeypatch.setattr(tensorrt_runtime, "_PLUGIN_LOGGER", [])
    calls: list = []
    trt = fake_trt(True, calls)
    register_plugins(trt)
    register_plugins(trt)
    assert len(calls) == 1 and calls[0][1] == "" and calls[0][0].severity == "warning"
    assert tensorrt_runtime._PLUGIN_LOGGER == [calls[0][0]]  # kept alive: the library holds the pointer

    monkeypatch.setattr(tensorrt_runtime, "_PLUGIN_LOGGER", [])
    with pytest.raises(BackendUnavailable, match="libnvinfer_plugin"):
        register_plugins(fake_trt(False, []))
    assert tensorrt_runtime._PLUGIN_LOGGER == []


# ---------------------------------------------------------------------------------------------- compress's stage
def stage_state(conf: float, engine: dict, enabled) -> SimpleNamespace:
    nms = SimpleNamespace(enabled=True, conf=conf, iou=0.45, max_det=10)
    recipe = SimpleNamespace(export=SimpleNamespace(nms=nms, tensorrt=SimpleNamespace(enabled=enabled)))
    return SimpleNamespace(recipe=recipe, notes=[], report={"exports": {"onnx_nms": {}, "tensorrt": engine}})


@pytest.mark.parametrize("conf, engine, enabled, reason", [
    (0.25, {"status": "skipped", "reason": "this machine lacks an NVIDIA GPU"}, True, "lacks an NVIDIA GPU"),
    (0.25, {"status": "skipped", "reason": "this machine lacks cuda-python"}, "auto", "lacks cuda-python"),
    (0.25, {"status": "disabled"}, False, "export.tensorrt is disabled"),
    (0.001, {"status": "built", "path": "model.engine"}, True, "below 0.007"),
])
def test_engine_stage_reports_why_no_nms_engine_was_built(conf, engine, enabled, reason):
    from compressor.app.nms_export import nms_engine_stage

    state = stage_state(conf, engine, enabled)
    nms_engine_stage(state)  # builds nothing: no TensorRT here, or a conf the plugin's dense kernel would get
    exports = state.report["exports"]
    assert exports["tensorrt_nms"]["status"] == ("skipped" if engine["status"] == "built" else engine["status"])
    assert reason in exports["tensorrt_nms"]["reason"]
    note = exports["onnx_nms"]["tensorrt"]
    assert "model.nms.engine" in note and PLUGIN in note and "not built" in note and reason in note
    assert state.notes == ([note] if enabled is True else [])  # a note when the recipe asked for engines


def test_report_md_gives_the_engines_parity_after_the_files():
    from compressor.app.report import _nms_parity

    parity = {"conf": 0.25, "iou": 0.45, "max_det": 10, "file_detections": 7, "samples": 4, "detections": 7,
              "matched": 6, "match_iou": 0.99, "edge_cases": 1, "max_box_relative_diff": 2e-5, "max_score_diff": 3e-6}
    report = {"compressed": {}, "parity": {"onnx_nms": parity, "tensorrt_nms": {**parity, "matched": 7,
                                                                                 "edge_cases": 0}}}
    lines = [line for line in _nms_parity(report) if line]
    assert len(lines) == 2 and lines[0].startswith("model.nms.onnx (conf 0.25")
    assert lines[1].startswith("model.nms.engine (TensorRT EfficientNMS_TRT, fp32): 7 detections on 4 samples")
    assert "7 matched, 0 on a threshold's edge" in lines[1]
    del report["parity"]["tensorrt_nms"]
    assert [line for line in _nms_parity(report) if line] == lines[:1]  # no engine, no line


# ---------------------------------------------------------------------------------------------- on a GPU
class HandMadeHead(torch.nn.Module):
    """The PyTorch twin of test_nms_export.fake_detector: the raw outputs are the first values of the image."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.output_layout = layout

    def forward(self, x):
        flat = x.flatten(1)
        if self.output_layout == "yolo":
            return flat[:, :(4 + CLASSES) * ANCHORS].reshape(-1, 4 + CLASSES, ANCHORS)
        boxes = flat[:, :ANCHORS * 4].reshape(-1, ANCHORS, 4)
        return boxes, flat[:, ANCHORS * 4:ANCHORS * (4 + CLASSES)].reshape(-1, ANCHORS, CLASSES)


@pytest.mark.parametrize("layout", ["yolo", "boxes_scores"])
def test_hand_made_head_twin_matches_the_onnx_stand_in(tmp_path, layout):
    """The GPU test's PyTorch reference is the ONNX stand-in's twin (checked here, where it can be)."""
    source = fake_detector(tmp_path / "model.onnx", layout)
    _, images = random_head(layout, 2, seed=1)
    ours = HandMadeHead(layout)(torch.from_numpy(images))
    ours = [ours] if layout == "yolo" else list(ours)
    for mine, theirs in zip(ours, create_session(source).run(None, {"input": images})):
        np.testing.assert_array_equal(mine.numpy(), theirs)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs an NVIDIA GPU, tensorrt and cuda-python")
@pytest.mark.parametrize("layout", ["yolo", "boxes_scores"])
def test_engine_of_the_hand_made_head_gives_exactly_the_expected_detections(tmp_path, layout):
    import tensorrt as trt

    from compressor.deploy.tensorrt_engine import build_engine, engine_settings
    from compressor.deploy.trt_nms import engine_detections, verify_nms_engine

    settings = {"conf": 0.25, "iou": 0.45, "max_det": 3}
    source = fake_detector(tmp_path / "model.onnx", layout)
    add_efficient_nms(source, tmp_path / ONNX_FILE, layout=layout, **settings)
    register_plugins(trt)
    built = build_engine(tmp_path / ONNX_FILE, engine_settings((3, SIZE, SIZE), [1, 3]), tmp_path / ENGINE_FILE)
    assert built["status"] == "built"
    for images in ([0], [0, 1, 2]):
        found = engine_detections(tmp_path / ENGINE_FILE, layout_inputs(layout, images), max_batch=3)
        for got, image in zip(found, images):
            want = EXPECTED[image]
            assert len(got["scores"]) == len(want)
            if want:
                np.testing.assert_allclose(got["boxes"], [w[:4] for w in want], atol=1e-4)
                np.testing.assert_allclose(got["scores"], [w[4] for w in want], atol=1e-6)
                assert got["labels"].tolist() == [w[5] for w in want]
    inputs = torch.from_numpy(layout_inputs(layout, [0, 1, 2]))
    result = verify_nms_engine(HandMadeHead(layout), tmp_path / ENGINE_FILE, inputs, layout=layout, **settings,
                               max_batch=3)
    assert result["passed"] and result["matched"] == result["detections"] == 6 and result["edge_cases"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs an NVIDIA GPU, tensorrt and cuda-python")
def test_yolo11n_nms_engine_passes_the_parity_rule(yolo, tmp_path):  # noqa: F811 - the imported fixture
    from compressor.app.recipe import recipe_from_dict
    from compressor.deploy.config import OnnxConfig
    from compressor.deploy.export import export_onnx
    from compressor.deploy.trt_nms import build_and_verify_nms

    path = tmp_path / "model.onnx"
    export_onnx(copy.deepcopy(yolo), torch.zeros(1, 3, SIZE, SIZE), path, OnnxConfig())
    recipe = recipe_from_dict({"name": "det", "task": "detection", "data": {"kind": "yolo", "yolo": "d.yaml"},
                               "model": {"arch": "ultralytics:yolo11n.yaml", "num_classes": 10,
                                         "input_shape": [3, SIZE, SIZE]},
                               "export": {"nms": {"enabled": True, "conf": 0.6, "iou": 0.45, "max_det": 8}},
                               "bench": {"batch_sizes": [1, 4]}})
    torch.manual_seed(1)
    images = torch.rand(5, 3, SIZE, SIZE)
    info = build_and_verify_nms(yolo, path, images, recipe, layout="yolo")  # batches 4 + 1
    assert info["status"] == "built" and info["path"] == str(tmp_path / ENGINE_FILE)
    assert info["onnx"]["path"] == str(tmp_path / ONNX_FILE) and info["settings"]["precision"] == "fp32"
    parity = info["parity"]
    assert parity["passed"] and parity["samples"] == 5 and parity["detections"] >= 10
    assert parity["matched"] + parity["edge_cases"] >= parity["detections"]
    assert parity["max_box_relative_diff"] <= 1e-3 and parity["max_score_diff"] <= 1e-4
