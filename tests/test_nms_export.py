"""A detector's ONNX with NMS in the graph (export.nms; compressor/deploy/nms_graph.py): exact detections of a
hand-made raw head at batch 1 and 3 in both raw layouts, YOLO11n's file against compressor's postprocess of the
PyTorch outputs (tasks/nms_parity.py, which also catches a wrong file), the session's tiny YOLO11n compress run
(64x64 scenes, 16 training and 8 validation images, one epoch; tests/task_runs.py) that writes, verifies, scores
and benchmarks the files on validation images, and the recipe check that refuses export.nms outside detection."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is first imported: no connectivity probe

from compressor.app.recipe import recipe_from_dict  # noqa: E402
from compressor.deploy.config import OnnxConfig  # noqa: E402
from compressor.deploy.export import export_onnx  # noqa: E402
from compressor.deploy.nms_graph import OUTPUTS, PAD_CLASS, add_nms, read_detections  # noqa: E402
from compressor.deploy.onnx_runtime import create_session  # noqa: E402
from compressor.deploy.runners import bench_input, random_input  # noqa: E402
from compressor.errors import ExportError, ParityError, RecipeError, UsageError  # noqa: E402
from compressor.tasks.nms_parity import compare_detections, reference_detections, verify_nms_onnx  # noqa: E402
from tests.conftest import invoke_cli  # noqa: E402

SIZE, CLASSES, ANCHORS = 64, 3, 6
SETTINGS = {"conf": 0.25, "iou": 0.45, "max_det": 3}


# ---------------------------------------------------------------------------------------------- a hand-made head
def anchor(cx: float, cy: float, w: float, h: float, *probs: float) -> list[float]:
    return [cx, cy, w, h, *probs]


# per image, ANCHORS rows of cx, cy, w, h and CLASSES probabilities (the "yolo" layout, transposed)
IMAGES = [
    [anchor(20, 20, 20, 20, 0.9, 0.1, 0.0),  # (10, 10, 30, 30) class 0: kept
     anchor(22, 20, 20, 20, 0.8, 0.0, 0.0),  # class 0, IoU 0.82 with the first: suppressed
     anchor(21, 20, 20, 20, 0.65, 0.7, 0.0),  # overlaps, but its one class is 1: kept as class 1 only
     anchor(50, 50, 10, 10, 0.0, 0.0, 0.1),  # below conf
     anchor(60, 60, 20, 20, 0.0, 0.5, 0.6),  # (50, 50, 70, 70) clipped to the image; class 2 (not 1 as well)
     anchor(40, 10, 8, 8, 0.05, 0.05, 0.05)],  # low everywhere
    [anchor(20 + 8 * i, 20, 6, 6, 0.2, 0.1, 0.05) for i in range(ANCHORS)],  # nothing above conf
    [anchor(8, 8, 10, 10, 0.9, 0, 0), anchor(30, 8, 10, 10, 0, 0.3, 0), anchor(8, 40, 10, 10, 0, 0, 0.8),
     anchor(40, 40, 10, 10, 0.5, 0, 0), anchor(40, 41, 10, 10, 0, 0, 0.26), anchor(60, 8, 4, 4, 0, 0, 0)],
]
# what the graph must return per image: x0, y0, x1, y1, score, class (highest score first; at most max_det = 3)
EXPECTED = [
    [(10, 10, 30, 30, 0.9, 0), (11, 10, 31, 30, 0.7, 1), (50, 50, 64, 64, 0.6, 2)],
    [],
    [(3, 3, 13, 13, 0.9, 0), (3, 35, 13, 45, 0.8, 2), (35, 35, 45, 45, 0.5, 0)],  # 0.3 and 0.26 past max_det
]


def raw_head(images: list[int]) -> np.ndarray:
    """The "yolo" raw tensor (N, 4 + C, A) of the chosen hand-made images."""
    return np.stack([np.asarray(IMAGES[i], np.float32).T for i in images])


def encode(raw: list[np.ndarray]) -> np.ndarray:
    """Input images (N, 3, SIZE, SIZE) whose first values are the raw tensors, flattened per image."""
    flat = np.concatenate([r.reshape(len(r), -1) for r in raw], axis=1)
    images = np.zeros((len(flat), 3 * SIZE * SIZE), np.float32)
    images[:, :flat.shape[1]] = flat
    return images.reshape(-1, 3, SIZE, SIZE)


def fake_detector(path: Path, layout: str) -> Path:
    """A stand-in model.onnx: its raw outputs are the first values of the input image (see encode), reshaped to
    the layout's tensors, so a test chooses every image's raw head; dynamic batch, opset 17."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    nodes.append(helper.make_node("Flatten", ["input"], ["flat"], axis=1))
    if layout == "yolo":
        shapes = {"logits": [-1, 4 + CLASSES, ANCHORS]}
    else:  # boxes (N, A, 4) xyxy, scores (N, A, C)
        shapes = {"boxes": [-1, ANCHORS, 4], "scores": [-1, ANCHORS, CLASSES]}
    start = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape[1:]))
        nodes.append(helper.make_node("Slice", ["flat", const(f"{name}_s", [start]), const(f"{name}_e", [start + size]),
                                             const(f"{name}_a", [1])], [f"{name}_flat"]))
        nodes.append(helper.make_node("Reshape", [f"{name}_flat", const(f"{name}_shape", shape)], [name]))
        start += size
    graph = helper.make_graph(
        nodes, "fake", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *s[1:]]) for n, s in shapes.items()], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def layout_inputs(layout: str, images: list[int]) -> np.ndarray:
    raw = raw_head(images)
    if layout == "yolo":
        return encode([raw])
    pred = raw.transpose(0, 2, 1)  # (N, A, 4 + C)
    cx, cy, w, h = (pred[..., i] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return encode([boxes, pred[..., 4:]])


def run(path: Path, inputs: np.ndarray) -> list[np.ndarray]:
    session = create_session(path, "ort-cpu")
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    return session.run(None, {"input": inputs})


@pytest.mark.parametrize("layout", ["yolo", "boxes_scores"])
def test_hand_made_head_gives_exactly_the_expected_detections_at_batch_1_and_3(tmp_path, layout):
    import onnx

    source = fake_detector(tmp_path / "model.onnx", layout)
    info = add_nms(source, tmp_path / "model.nms.onnx", layout=layout, **SETTINGS)
    graph = onnx.load(str(tmp_path / "model.nms.onnx")).graph
    assert [n.op_type for n in graph.node].count("NonMaxSuppression") == 1
    assert [i.name for i in graph.input] == ["input"] and info["outputs"] == list(OUTPUTS)
    assert graph.output[1].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch kept

    for images in ([0], [0, 1, 2]):
        num, boxes, scores, classes = run(tmp_path / "model.nms.onnx", layout_inputs(layout, images))
        n = len(images)
        assert num.dtype == np.int32 and num.shape == (n, 1)
        assert boxes.dtype == np.float32 and boxes.shape == (n, 3, 4)
        assert scores.shape == (n, 3) and classes.dtype == np.int32 and classes.shape == (n, 3)
        for row, image in enumerate(images):
            want = EXPECTED[image]
            assert int(num[row, 0]) == len(want)
            k = len(want)
            if want:
                np.testing.assert_allclose(boxes[row, :k], [w[:4] for w in want], atol=1e-5)
                np.testing.assert_allclose(scores[row, :k], [w[4] for w in want], atol=1e-6)
                assert classes[row, :k].tolist() == [w[5] for w in want]
            # padding past num_dets: zero boxes and scores, class -1
            assert not boxes[row, k:].any() and not scores[row, k:].any()
            assert (classes[row, k:] == PAD_CLASS).all()


def test_bad_settings_and_a_second_pass_are_refused(tmp_path):
    source = fake_detector(tmp_path / "model.onnx", "yolo")
    with pytest.raises(ExportError, match="conf 1.0"):
        add_nms(source, tmp_path / "x.onnx", layout="yolo", conf=1.0, iou=0.5, max_det=3)
    with pytest.raises(ExportError, match="2 raw outputs"):
        add_nms(source, tmp_path / "x.onnx", layout="boxes_scores", **SETTINGS)
    add_nms(source, tmp_path / "model.nms.onnx", layout="yolo", **SETTINGS)
    with pytest.raises(ExportError, match="post-processed before"):
        add_nms(tmp_path / "model.nms.onnx", tmp_path / "twice.onnx", layout="yolo", **SETTINGS)


# ---------------------------------------------------------------------------------------------- the parity rule
def dets(*rows: tuple) -> dict[str, np.ndarray]:
    """Detections from (x0, y0, x1, y1, score, class) rows."""
    a = np.asarray(rows, np.float64).reshape(-1, 6)
    return {"boxes": a[:, :4].astype(np.float32), "scores": a[:, 4].astype(np.float32),
            "labels": a[:, 5].astype(np.int64)}


def test_parity_matches_by_box_and_names_a_real_disagreement():
    ref = [dets((0, 0, 10, 10, 0.9, 1), (20, 20, 30, 30, 0.9, 2))]
    swapped = [dets((20, 20, 30, 30, 0.9, 2), (0, 0, 10, 10, 0.9, 1))]  # a tie in another order
    result = compare_detections(ref, swapped, conf=0.25, iou=0.45, max_det=10)
    assert result["passed"] and result["matched"] == 2 and result["edge_cases"] == 0
    with pytest.raises(ParityError, match="only the NMS file has"):  # a detection nowhere near a threshold
        compare_detections(ref, [dets((0, 0, 10, 10, 0.9, 1), (20, 20, 30, 30, 0.9, 2), (40, 40, 50, 50, 0.8, 0))],
                           conf=0.25, iou=0.45, max_det=10)
    with pytest.raises(ParityError, match="matched boxes differ"):  # IoU 0.995: matched, but 0.05 px is 5e-3
        compare_detections(ref, [dets((0, 0, 10.05, 10, 0.9, 1), (20, 20, 30, 30, 0.9, 2))],
                           conf=0.25, iou=0.45, max_det=10)
    with pytest.raises(ParityError, match="matched scores differ"):
        compare_detections(ref, [dets((0, 0, 10, 10, 0.8995, 1), (20, 20, 30, 30, 0.9, 2))],
                           conf=0.25, iou=0.45, max_det=10)
    # two tied candidates of one class overlapping above iou: which one NMS keeps is the sort's choice
    anchors = dets((0, 0, 10, 10, 0.9, 1), (0, 1, 10, 11, 0.9, 1))
    anchors["ambiguous"] = np.zeros(2, bool)
    tie = compare_detections([{**dets((0, 0, 10, 10, 0.9, 1)), "candidates": anchors}],
                             [dets((0, 1, 10, 11, 0.9, 1))], conf=0.25, iou=0.45, max_det=10)
    assert tie["passed"] and tie["edge_cases"] == 2 and tie["matched"] == 0
    # ... but a box no PyTorch anchor predicts is not a tie, even at the same score
    with pytest.raises(ParityError, match="only the NMS file has"):
        compare_detections([{**dets((0, 0, 10, 10, 0.9, 1)), "candidates": anchors}],
                           [dets((0, 2, 10, 12, 0.9, 1))], conf=0.25, iou=0.45, max_det=10)
    # a score on conf's edge may be in one and not the other: counted, not an error
    edge = compare_detections([dets((0, 0, 10, 10, 0.9, 1), (40, 40, 50, 50, 0.25004, 0))],
                              [dets((0, 0, 10, 10, 0.9, 1))], conf=0.25, iou=0.45, max_det=10)
    assert edge["passed"] and edge["edge_cases"] == 1 and edge["count_mismatches"] == 1


# ---------------------------------------------------------------------------------------------- YOLO11n
@pytest.fixture(scope="module")
def yolo():
    """YOLO11n with batch-norm statistics of random images (a fresh model's activations fade to ~1e-9 through its
    layers, so every image gets the same boxes) and its class convolutions scaled to probabilities around 0.5-0.95
    (no saturated ties at 1.0): boxes and scores that depend on the image."""
    pytest.importorskip("ultralytics")
    from torch import nn

    from compressor.models.loading import build_arch

    torch.manual_seed(0)
    model = build_arch("ultralytics:yolo11n.yaml", 10, 3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average of the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, SIZE, SIZE))
        for branch in model.head.cv3:
            branch[2].weight.mul_(0.05)
            branch[2].bias.zero_()
    return model.eval()


def test_yolo11n_nms_file_matches_compressors_postprocess(yolo, tmp_path):
    path = tmp_path / "model.onnx"
    export_onnx(copy.deepcopy(yolo), torch.zeros(1, 3, SIZE, SIZE), path, OnnxConfig())
    settings = {"layout": "yolo", "conf": 0.6, "iou": 0.45, "max_det": 8}  # filtering, NMS and the max_det cut
    add_nms(path, tmp_path / "model.nms.onnx", **settings)
    torch.manual_seed(1)
    images = torch.rand(5, 3, SIZE, SIZE)
    reference = reference_detections(yolo, images, **settings)
    counts = [len(d["scores"]) for d in reference]
    assert sum(counts) >= 10 and max(counts) == 8 and min(counts) == 0  # content-dependent, cut at max_det
    result = verify_nms_onnx(yolo, tmp_path / "model.nms.onnx", images, **settings, batch_size=3)  # batches 3 + 2
    assert result["passed"] and result["samples"] == 5
    assert result["detections"] == result["file_detections"] == sum(counts)
    assert result["matched"] == sum(counts) and result["edge_cases"] == 0
    assert result["max_box_relative_diff"] <= 1e-3 and result["max_score_diff"] <= 1e-4
    file = read_detections(create_session(tmp_path / "model.nms.onnx").run(None, {"input": images.numpy()}))
    assert [len(d["scores"]) for d in file] == counts
    for mine, theirs in zip(file, reference):  # highest score first, as postprocess orders them
        np.testing.assert_allclose(mine["scores"], theirs["scores"], atol=1e-4)
    # a file built at another IoU is a different detector: the check says so
    add_nms(path, tmp_path / "wrong.nms.onnx", **{**settings, "iou": 0.9})
    with pytest.raises(ParityError, match="disagrees with compressor's postprocess"):
        verify_nms_onnx(yolo, tmp_path / "wrong.nms.onnx", images, **settings)


# ---------------------------------------------------------------------------------------------- bench inputs
def test_bench_input_draws_batches_from_the_pool():
    pool = np.arange(3 * 2 * 2 * 2, dtype=np.float32).reshape(3, 2, 2, 2)
    assert np.array_equal(bench_input((2, 2, 2, 2), pool=pool), pool[:2])
    assert np.array_equal(bench_input((5, 2, 2, 2), pool=torch.from_numpy(pool)), pool[[0, 1, 2, 0, 1]])
    assert np.array_equal(bench_input((2, 2, 2, 2)), random_input((2, 2, 2, 2)))
    with pytest.raises(UsageError, match=r"samples of shape \(2, 2, 2\)"):
        bench_input((1, 3, 2, 2), pool=pool)


def test_ort_runner_times_the_pools_images(tmp_path):
    from compressor.deploy.timing import make_runner

    source = fake_detector(tmp_path / "model.onnx", "yolo")
    pool = layout_inputs("yolo", [0, 1, 2])
    runner = make_runner("ort-cpu", source, inputs=pool)
    runner.prepare(4)
    assert np.array_equal(runner.feed["input"], pool[[0, 1, 2, 0]])
    runner.close()


# ---------------------------------------------------------------------------------------------- compress
def test_nms_outside_detection_is_a_recipe_error():
    with pytest.raises(RecipeError, match="export.nms.enabled .* task is classification"):
        recipe_from_dict({"name": "cls", "export": {"nms": {"enabled": True}}})
    with pytest.raises(RecipeError, match="export.nms.max_det"):
        recipe_from_dict({"name": "x", "task": "detection", "data": {"kind": "yolo", "yolo": "d.yaml"},
                          "export": {"nms": {"enabled": True, "max_det": 0}}})


def test_recipe_error_exits_2_naming_the_field(tmp_path):
    recipe = tmp_path / "cls.yaml"
    recipe.write_text("name: cls\nexport: {nms: {enabled: true}}\n")
    result = invoke_cli("compress", "zoo:resnet20", "--recipe", recipe, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "export.nms.enabled" in result.stderr and "task is classification" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.fixture
def nms_run(task_run):
    """The session's YOLO11n compress run (tests/task_runs.py), with export.nms conf 0.001, iou 0.5, max_det 30
    and bench batch sizes 1 and 2."""
    run = task_run("yolo11n")
    assert run.recipe["export"]["nms"] == {"enabled": True, "conf": 0.001, "iou": 0.5, "max_det": 30}
    assert run.recipe["bench"]["batch_sizes"] == [1, 2] and run.recipe["verify"]["samples"] == 8
    assert run.result.returncode == 0 and run.report is not None, run.result.stderr[-3000:]
    return run.out, run.report


def test_compress_writes_verifies_and_scores_the_nms_files(nms_run):
    out, report = nms_run
    assert (out / "model.nms.onnx").is_file() and (out / "dense.nms.onnx").is_file()
    assert report["exports"]["onnx_nms"]["max_det"] == 30 and "EfficientNMS_TRT" in report["exports"]["onnx_nms"][
        "tensorrt"]
    parity = report["parity"]["onnx_nms"]
    assert parity["passed"] and parity["samples"] == 8 and parity["conf"] == 0.001
    assert parity["matched"] + parity["edge_cases"] >= parity["detections"] > 0
    assert 0.0 <= report["compressed"]["onnx_nms_map50_95"] <= report["compressed"]["onnx_nms_map50"] <= 100.0
    num, boxes, _, classes = create_session(out / "model.nms.onnx").run(None, {"input": np.zeros((2, 3, SIZE, SIZE),
                                                                                                  np.float32)})
    assert num.shape == (2, 1) and boxes.shape == (2, 30, 4) and classes.shape == (2, 30)
    md = (out / "report.md").read_text()
    assert "model.nms.onnx (conf 0.001, iou 0.5, max_det 30)" in md and "speedup with NMS" in md


def test_detection_bench_times_validation_images_with_and_without_nms(nms_run):
    out, report = nms_run
    rows = report["latency"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for row in rows:
        assert row["inputs"]["kind"] == "validation" and row["inputs"]["images"] == 2
        nms = row["nms"]
        assert nms["dense"]["p50"] > 0 and nms["compressed"]["p50"] > 0
        assert nms["speedup"] == pytest.approx(nms["dense"]["p50"] / nms["compressed"]["p50"])
        assert row["speedup"] == pytest.approx(row["dense"]["p50"] / row["compressed"]["p50"])
    assert "Inputs: 2 validation images" in (out / "report.md").read_text()
