"""Detection and segmentation through the CLI, in-process (invoke_cli): a compress run of each task reports its
task, its metrics and the exported file's metrics beside PyTorch's; `compressor eval` of the exported file gives
the report's numbers; `compressor export` of a run passes the task's parity rule, and an export with a planted bad
weight fails it with exit 1; every kind of bad dataset stops `compressor eval` and `compressor compress` with exit 2
naming the file (and line), before anything of a run is written. Tiny 64x64 scenes (16 training, 8 validation
images), one fine-tuning epoch; the compress runs are the session's shared ones (tests/task_runs.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is first imported: no connectivity probe

from tests.conftest import invoke_cli, requires_fmnist  # noqa: E402
from tests.task_runs import TASK_MODELS as RUNS, task_recipe  # noqa: E402

pytestmark = requires_fmnist
pytest.importorskip("ultralytics")
pytest.importorskip("torchmetrics")

ONNX_POINTS = 0.3  # the exported file's primary metric within this many points of PyTorch's
SECOND = {"map50_95": "map50", "miou": "pixel_acc"}  # each task's other metric column


def write_recipe(path: Path, run, scenes: Path) -> Path:
    path.write_text(yaml.safe_dump(task_recipe(run, scenes)))
    return path


def flat(text: str) -> str:
    """CLI output as one line: the console wraps long messages at whitespace."""
    return " ".join(text.split())


@pytest.fixture
def broken(task_scenes, tmp_path) -> Path:
    """A private copy of the scenes to break; its data.yaml's path points at the copy."""
    from tests.task_runs import copy_scenes

    return copy_scenes(task_scenes, tmp_path / "scenes")


@pytest.fixture
def runs(task_run):
    """The session's compress run of a model (tests/task_runs.py): (run directory, recipe file, CLI result)."""
    def get(key: str):
        run = task_run(key)
        return run.out, run.recipe_file, run.result

    return get


# ---------------------------------------------------------------------------------------------- good runs
@pytest.mark.parametrize("key", list(RUNS))
def test_compress_reports_the_task_its_metrics_and_the_exports(key, runs):
    out, _, result = runs(key)
    run = RUNS[key]
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    assert report["task"]["name"] == run.task and report["task"]["primary"] == run.primary
    assert report["task"]["label"] == run.label
    primary, second = run.primary, SECOND[run.primary]
    for side in ("dense", "compressed"):
        assert 0.0 <= report[side][primary] <= 100.0 and 0.0 <= report[side][second] <= 100.0, report[side]
        assert report[side]["count"] == 8
    assert "top1" not in report["compressed"]
    assert report["compressed"]["macs"] / report["dense"]["macs"] == pytest.approx(0.6, rel=0.02)
    # the exported file scored by the same evaluator on the same images
    parity = report["parity"]["onnx"]
    assert parity["passed"] and parity["artifact"] == "ONNX model.onnx" and parity["samples"] == 8
    assert abs(report["compressed"][f"onnx_{primary}"] - report["compressed"][primary]) <= ONNX_POINTS
    assert abs(report["compressed"][f"onnx_{second}"] - report["compressed"][second]) <= ONNX_POINTS
    assert (out / "model.onnx").is_file() and (out / "dense.onnx").is_file()
    assert f"{run.label} {report['dense'][primary]:.2f}" in result.stdout and "report:" in result.stdout


@pytest.mark.parametrize("key", list(RUNS))
def test_eval_of_the_exported_file_gives_the_reported_metrics(key, runs):
    """`compressor eval model.onnx` reads a detector's layout off the file (one output: YOLO's, two: boxes and
    scores) and scores it as compress did."""
    out, recipe, result = runs(key)
    assert result.returncode == 0, result.stderr[-3000:]
    compressed = json.loads((out / "report.json").read_text())["compressed"]
    evaluated = invoke_cli("eval", out / "model.onnx", "--recipe", recipe)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    run = RUNS[key]
    assert f"{run.label} {compressed[f'onnx_{run.primary}']:.2f}" in evaluated.stdout
    assert f"(8 images of {run.kind})" in evaluated.stdout


@pytest.mark.parametrize("key", ["yolo11n", "lraspp"])
def test_export_of_a_run_passes_the_tasks_parity_rule(key, runs, tmp_path):
    """A correct export of a detector (pixel boxes up to hundreds) or a segmenter (per-pixel logits) passes: the
    task's parity rule and its least relative tolerance apply, as in compress."""
    out, recipe, result = runs(key)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = invoke_cli("export", out, "--recipe", recipe, "--out", tmp_path / "again.onnx")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "parity max abs diff" in exported.stdout and (tmp_path / "again.onnx").is_file()
    # without a recipe the task comes from the model itself (a detector names its output layout, a segmenter
    # exports at any size): the same rule on random inputs
    bare = invoke_cli("export", out, "--out", tmp_path / "bare.onnx")
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert "parity max abs diff" in bare.stdout and (tmp_path / "bare.onnx").is_file()


def test_a_planted_bad_weight_in_the_exported_detector_fails_parity(runs, tmp_path, monkeypatch):
    """The export is written, then one weight tensor of the file (the stem convolution's) is negated: parity against
    the PyTorch model fails with exit 1 naming the file, which is not left behind looking verified."""
    import onnx
    from onnx import numpy_helper

    import compressor.app.exporting

    out, recipe, result = runs("yolo11n")
    assert result.returncode == 0, result.stderr[-3000:]
    real = compressor.app.exporting.export_onnx
    planted = {}

    def export_then_plant(model, example, path, cfg, **kwargs):
        info = real(model, example, path, cfg, **kwargs)
        proto = onnx.load(str(path))
        weights = {t.name: t for t in proto.graph.initializer}
        stem = next(n.input[1] for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in weights)
        bad = -numpy_helper.to_array(weights[stem])
        weights[stem].CopyFrom(numpy_helper.from_array(bad, stem))
        onnx.save(proto, str(path))
        planted["name"] = stem
        return info

    monkeypatch.setattr(compressor.app.exporting, "export_onnx", export_then_plant)
    bad = tmp_path / "bad.onnx"
    failed = invoke_cli("export", out, "--recipe", recipe, "--out", bad)
    assert planted and failed.returncode == 1, failed.stderr[-3000:]
    message = flat(failed.stderr)
    assert "parity check failed: ONNX bad.onnx disagrees with the PyTorch model on 8 validation samples" in message
    assert "max abs diff" in message and "Traceback" not in failed.stderr
    assert not bad.exists()


# ---------------------------------------------------------------------------------------------- bad datasets
def _coco(root: Path) -> tuple[Path, dict]:
    path = root / "annotations" / "instances_val.json"
    return path, json.loads(path.read_text())


def missing_image(root: Path) -> tuple[Path, list[str]]:
    (root / "images" / "val" / "000003.png").unlink()
    path, _ = _coco(root)
    return path, [f"{path}: image 4 (000003.png) is missing: {root / 'images' / 'val' / '000003.png'} does not exist"]


def box_outside(root: Path) -> tuple[Path, list[str]]:
    path, data = _coco(root)
    data["annotations"][1]["bbox"] = [40, 40, 40, 40]
    path.write_text(json.dumps(data))
    aid = data["annotations"][1]["id"]
    return path, [f"annotation {aid}", "box [40, 40, 80, 80] (x0, y0, x1, y1) lies outside the 64x64 image"]


def coco_box_without_size(root: Path) -> tuple[Path, list[str]]:
    path, data = _coco(root)
    data["annotations"][0]["bbox"] = [10, 10, 0, 12]
    path.write_text(json.dumps(data))
    return path, [f"annotation {data['annotations'][0]['id']}", "has non-positive width or height (0 x 12)"]


def _label(root: Path, lines: list[str]) -> Path:
    path = root / "labels" / "val" / "000002.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def yolo_box_without_size(root: Path) -> tuple[Path, list[str]]:
    path = _label(root, ["1 0.5 0.5 0.25 0.25", "4 0.5 0.5 0.0 0.25"])
    return path, [f"{path} line 2", "has non-positive width or height"]


def class_out_of_range(root: Path) -> tuple[Path, list[str]]:
    path = _label(root, ["10 0.5 0.5 0.25 0.25"])
    return path, [f"{path} line 1: class 10 is not below the number of classes", "model.num_classes 10"]


def coco_unknown_category(root: Path) -> tuple[Path, list[str]]:
    path, data = _coco(root)
    data["annotations"][2]["category_id"] = 11
    path.write_text(json.dumps(data))
    return path, [f"annotation {data['annotations'][2]['id']}", "has category_id 11, which is not in the categories"]


def malformed_line(root: Path) -> tuple[Path, list[str]]:
    path = _label(root, ["1 0.5 0.5 0.25 0.25", "", "3 0.5 0.5 0.25"])
    return path, [f"{path} line 3: '3 0.5 0.5 0.25' has 4 values, not 5"]


def mask_out_of_range(root: Path) -> tuple[Path, list[str]]:
    from PIL import Image

    path = root / "masks" / "val" / "000005.png"
    mask = np.array(Image.open(path))
    mask[:4, :4] = 11
    Image.fromarray(mask).save(path)
    return path, [f"mask {path} has values 11 outside 0..10 (model.num_classes 11"]


BAD = {
    "coco-missing-image": ("ssdlite", missing_image),
    "coco-box-outside": ("ssdlite", box_outside),
    "coco-box-without-size": ("ssdlite", coco_box_without_size),
    "coco-unknown-category": ("ssdlite", coco_unknown_category),
    "yolo-box-without-size": ("yolo11n", yolo_box_without_size),
    "yolo-class-out-of-range": ("yolo11n", class_out_of_range),
    "yolo-malformed-line": ("yolo11n", malformed_line),
    "mask-out-of-range": ("lraspp", mask_out_of_range),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_dataset_stops_eval_with_exit_2_naming_the_file(case, broken, tmp_path):
    key, breaks = BAD[case]
    run = RUNS[key]
    # the coco and yolo readers do not depend on the model: YOLO11n (built in a moment) reads both
    reference = RUNS["yolo11n"].reference if run.task == "detection" else run.reference
    path, expected = breaks(broken)
    recipe = write_recipe(tmp_path / "r.yaml", run, broken)
    result = invoke_cli("eval", reference, "--recipe", recipe)
    assert result.returncode == 2, (result.stdout, result.stderr[-3000:])
    message = flat(result.stderr)
    assert message.startswith("data error: ") and str(path) in message, message
    for text in expected:
        assert text in message, message
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["yolo", "coco"])
def test_images_without_objects_are_valid(kind, broken, tmp_path):
    """Background images (an empty label file, a missing one, an image no annotation refers to) are samples."""
    if kind == "yolo":
        (broken / "labels" / "val" / "000001.txt").write_text("")
        (broken / "labels" / "val" / "000004.txt").unlink()
    else:
        path, data = _coco(broken)
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in (2, 5)]
        path.write_text(json.dumps(data))
    run = RUNS["yolo11n" if kind == "yolo" else "ssdlite"]
    recipe = write_recipe(tmp_path / "r.yaml", run, broken)
    result = invoke_cli("eval", RUNS["yolo11n"].reference, "--recipe", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(8 images of {kind})" in result.stdout and "mAP50-95" in result.stdout


def test_compress_on_a_bad_dataset_writes_no_run(broken, tmp_path):
    """The data is read and checked before anything is trained or written: the run directory holds only the
    recipe it was asked to run (prepare_run_dir's marker), no report and no model."""
    path, expected = malformed_line(broken)
    recipe = write_recipe(tmp_path / "r.yaml", RUNS["yolo11n"], broken)
    out = tmp_path / "run"
    result = invoke_cli("compress", RUNS["yolo11n"].reference, "--recipe", recipe, "--out", out)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected[0] in flat(result.stderr)
    assert not (out / "report.json").exists() and not (out / "model.onnx").exists()
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]
