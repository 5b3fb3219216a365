"""What a person reads in a detection or segmentation run: plot_examples.png (a few validation images with the
ground truth, the dense and the compressed model's predictions side by side) with report.json `examples` and its
report.md section, and for a YOLO model the compressed model in Ultralytics' format (ultralytics.pt) that
ultralytics.YOLO loads, predicts and validates with. The session's tiny compress runs of YOLO11n and LRASPP (64x64
scenes, 16 training and 8 validation images, one epoch; tests/task_runs.py); stand-in models give known
predictions."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset

os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is first imported: no connectivity probe

from compressor.app.examples import FIGURE, class_names, collect_examples, write_figure  # noqa: E402
from compressor.app.pipeline import RUN_ARTIFACTS, prepare_run_dir  # noqa: E402
from compressor.app.recipe import recipe_from_dict  # noqa: E402
from compressor.datasets.scenes import CLASSES  # noqa: E402
from compressor.tasks import build_task  # noqa: E402
from compressor.tasks.boxes import postprocess  # noqa: E402
from compressor.train.data import SUBSET_SEED, build_datasets, subset_indices  # noqa: E402
from tests.conftest import requires_fmnist  # noqa: E402
from tests.task_runs import SIZE, VAL  # noqa: E402


def _run(task_run, key: str) -> tuple[Path, dict, dict]:
    """The session's compress run of `key` (tests/task_runs.py): its directory, the report compress returned and
    the recipe."""
    run = task_run(key)
    assert run.result.returncode == 0 and run.report is not None, run.result.stderr[-3000:]
    return run.out, run.report, run.recipe


@pytest.fixture
def det_run(task_run):
    pytest.importorskip("ultralytics")
    return _run(task_run, "yolo11n")


@pytest.fixture
def seg_run(task_run):
    pytest.importorskip("torchmetrics")
    return _run(task_run, "lraspp")


def val_set(recipe: dict):
    return build_datasets(recipe_from_dict(recipe).data, recipe_from_dict(recipe).model)[1]


def check_figure(path: Path, columns: int = 3, rows: int = 4) -> None:
    """A PNG of `rows` x `columns` panels a person can read: each panel some 200-400 pixels, nothing huge."""
    with Image.open(path) as image:
        width, height = image.size
    assert 200 * columns <= width <= 400 * columns + 200, image.size
    assert 200 * rows <= height <= 400 * rows + 300, image.size


def check_markdown(out: Path) -> str:
    md = (out / "report.md").read_text()
    assert "## Example predictions" in md
    assert md.count(f"![examples]({FIGURE})") == 1  # in its section, not again with the other plots
    assert md.index("## Example predictions") < md.index("![widths]")
    return md


# ---------------------------------------------------------------------------------------------- detection run
@requires_fmnist
def test_detection_run_shows_example_predictions(det_run):
    out, report, recipe = det_run
    check_figure(out / FIGURE)
    assert report["plots"]["examples"] == str(out / FIGURE)
    examples = json.loads((out / "report.json").read_text())["examples"]
    assert examples == report["examples"]
    assert examples["task"] == "detection" and examples["models"] == ["dense", "compressed"]
    assert examples["indices"] == subset_indices(VAL, 4, SUBSET_SEED) and len(examples["images"]) == 4
    assert examples["classes"] == list(CLASSES) and examples["score_threshold"] == 0.25
    data = val_set(recipe)
    for row, index in zip(examples["images"], examples["indices"]):
        _, target = data[index]
        assert row["index"] == index
        assert row["ground_truth"]["labels"] == target["labels"].tolist()
        np.testing.assert_allclose(np.reshape(row["ground_truth"]["boxes"], (-1, 4)), target["boxes"].reshape(-1, 4),
                                   atol=0.01)
        for model in ("dense", "compressed"):
            shown = row[model]
            assert len(shown["boxes"]) == len(shown["labels"]) == len(shown["scores"])
            assert all(s > 0.25 for s in shown["scores"])
    md = check_markdown(out)
    assert "boxes scoring above 0.25" in md and "`ultralytics.pt`" in md


@requires_fmnist
def test_yolo_run_writes_an_ultralytics_checkpoint(det_run, monkeypatch):
    """ultralytics.pt: the compressed model's widths and names; Ultralytics' outputs and predictions on a validation
    image are the compressed model's with its weights in half precision; YOLO(path).val() reads the run's data."""
    from ultralytics import YOLO

    out, report, recipe = det_run
    path = out / "ultralytics.pt"
    assert report["artifacts"]["ultralytics"] == str(path) and path.is_file()
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["train_args"]["imgsz"] == SIZE
    assert checkpoint["train_args"]["data"] == str(Path(recipe["data"]["yolo"]).resolve())

    compressed = torch.load(out / "model.pt", map_location="cpu", weights_only=False).eval()
    rounded = compressed.half().float()
    yolo = YOLO(str(path))
    assert yolo.names == dict(enumerate(CLASSES))
    image, _ = val_set(recipe)[0]
    with torch.no_grad():
        theirs = yolo.model.float().eval()(image[None])[0]
        ours = rounded(image[None])
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)

    # predictions: Ultralytics' predict on the image (a BGR uint8 array) against compressor's postprocess with
    # Ultralytics' order (NMS on the unclipped boxes, then clipped to the image)
    frame = np.ascontiguousarray((image.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype(np.uint8))
    (result,) = yolo.predict(frame, imgsz=SIZE, conf=0.0, iou=0.7, max_det=300, device="cpu", verbose=False)
    with torch.no_grad():
        (mine,) = postprocess(rounded((torch.from_numpy(frame[..., ::-1].copy()).permute(2, 0, 1) / 255.0)[None]),
                              "yolo", conf=0.0, iou=0.7, max_det=300)
    k = 10  # the strongest detections: fp16 rounding may reorder near-ties further down
    assert len(result.boxes) == len(mine["scores"]) > k
    np.testing.assert_allclose(result.boxes.conf[:k].numpy(), mine["scores"][:k].numpy(), atol=2e-3)
    for box in result.boxes.xyxy[:k]:  # each of theirs is one of ours, within half a pixel
        assert float(torch.cdist(box[None].float(), mine["boxes"][:k].clamp(0, SIZE)).min()) < 0.5

    monkeypatch.setattr("ultralytics.data.utils.check_font", lambda *a, **k: None)  # no font download
    metrics = yolo.val(batch=4, device="cpu", workers=0, plots=False, verbose=False, project=str(out.parent / "val"),
                       name="val")  # data and imgsz: the checkpoint's (the run's dataset YAML, 64)
    for cache in Path(recipe["data"]["yolo"]).parent.rglob("*.cache"):  # Ultralytics' label cache, written
        cache.unlink()  # beside the labels: the session's shared scenes stay as the other tests expect them
    assert 0.0 <= float(metrics.box.map) <= 1.0 and metrics.box.nc == len(CLASSES)


@requires_fmnist
def test_overwrite_removes_the_ultralytics_checkpoint(det_run, tmp_path):
    out, _, recipe = det_run
    assert "ultralytics.pt" in RUN_ARTIFACTS
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    assert (copy / "ultralytics.pt").is_file() and (copy / FIGURE).is_file()
    prepare_run_dir(copy, recipe_from_dict(recipe), resume=False, overwrite=True)
    assert sorted(p.name for p in copy.iterdir()) == ["recipe.yaml"]


# ---------------------------------------------------------------------------------------------- segmentation run
@requires_fmnist
def test_segmentation_run_shows_example_predictions(seg_run):
    """Per image, each class's pixels of the ground truth and of both models; the compressed model's equal what
    the saved model predicts; no masks in report.json."""
    out, report, recipe = seg_run
    check_figure(out / FIGURE)
    examples = report["examples"]
    assert examples["task"] == "segmentation" and examples["ignore_index"] == 255
    assert examples["indices"] == subset_indices(VAL, 4, SUBSET_SEED) and len(examples["images"]) == 4
    assert examples["classes"] == [str(i) for i in range(11)]  # the masks data kind names no classes
    assert len(json.dumps(examples)) < 4000  # no per-pixel data
    data = val_set(recipe)
    compressed = torch.load(out / "model.pt", map_location="cpu", weights_only=False).eval()
    images = torch.stack([data[i][0] for i in examples["indices"]])
    with torch.no_grad():
        predicted = compressed(images).argmax(1)
    for row, index, mine in zip(examples["images"], examples["indices"], predicted):
        mask = data[index][1]
        assert row["ground_truth"]["class_pixels"] == torch.bincount(mask.flatten(), minlength=11).tolist()
        assert row["compressed"]["class_pixels"] == torch.bincount(mine.flatten(), minlength=11).tolist()
        assert row["compressed"]["pixel_acc"] == pytest.approx(100.0 * float((mine == mask).float().mean()), abs=0.01)
        assert sum(row["dense"]["class_pixels"]) == SIZE * SIZE and 0 <= row["dense"]["pixel_acc"] <= 100
    md = check_markdown(out)
    assert "class masks" in md and "| mIoU % | pixel acc. % |" in md  # the segmentation task's report columns
    assert "ultralytics" not in report["artifacts"] and not (out / "ultralytics.pt").exists()


# ---------------------------------------------------------------------------------------------- stand-ins
class Boxes(Dataset):
    classes = ["cat", "dog", "fox"]

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        return torch.full((3, 32, 32), index / 10), {"boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0]]),
                                                     "labels": torch.tensor([index % 3])}


class FixedDetector(nn.Module):
    """A 'yolo' layout detector with three anchors: class 1 at 0.9 (box 4..16 x 6..26), class 2 at 0.5, one at
    0.2 (under the display threshold)."""

    output_layout = "yolo"

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = torch.tensor([[10.0, 16.0, 12.0, 20.0], [25.0, 8.0, 6.0, 6.0], [5.0, 5.0, 4.0, 4.0]]).T  # (4, 3)
        scores = torch.tensor([[0.0, 0.9, 0.0], [0.1, 0.0, 0.5], [0.2, 0.0, 0.0]]).T  # (3 classes, 3 anchors)
        return (torch.cat([boxes, scores]) * self.scale).expand(len(x), -1, -1)


def test_detection_examples_of_known_predictions(tmp_path):
    task = build_task("detection", 3)
    model, dense = FixedDetector().train(), FixedDetector()
    examples = collect_examples(task, Subset(Boxes(), [0, 1, 2, 3, 4, 5]), model, dense)
    assert model.training  # the mode is restored
    summary = examples.summary()
    assert summary["indices"] == subset_indices(6, 4, SUBSET_SEED) and summary["classes"] == Boxes.classes
    for row in summary["images"]:
        assert row["ground_truth"] == {"boxes": [[2.0, 3.0, 20.0, 30.0]], "labels": [row["index"] % 3]}
        for name in ("dense", "compressed"):  # highest score first; the 0.2 box is not shown
            assert row[name] == {"boxes": [[4.0, 6.0, 16.0, 26.0], [22.0, 5.0, 28.0, 11.0]], "labels": [1, 2],
                                 "scores": [0.9, 0.5]}
    check_figure(write_figure(examples, tmp_path, metrics={"dense": "mAP50-95 1.00"}))
    alone = collect_examples(task, Boxes(), model)  # deploy() without a dense model: no dense column
    assert alone.summary()["models"] == ["compressed"]
    check_figure(write_figure(alone, tmp_path), columns=2)


class Masks(Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int):
        mask = torch.zeros(16, 16, dtype=torch.long)
        mask[:8] = 2
        mask[0, :4] = 255  # ignored
        return torch.rand(3, 16, 16), mask


class HalfTwo(nn.Module):
    """Logits (N, 3, 16, 16): class 2 in the left half, class 0 in the right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 3, 16, 16)
        logits[:, 2, :, :8] = 5.0
        logits[:, 0, :, 8:] = 5.0
        return logits


def test_segmentation_examples_of_known_predictions(tmp_path):
    task = build_task("segmentation", 3)
    examples = collect_examples(task, Masks(), HalfTwo(), HalfTwo(), classes=["bg", "a", "b"])
    row = examples.summary()["images"][0]
    assert row["ground_truth"]["class_pixels"] == [128, 0, 124]  # the 4 ignored pixels not counted
    # class 2 in columns 0-7: against the truth, 60 pixels of class 2 (4 of 64 are ignored) and 64 of class 0 agree
    assert row["dense"]["class_pixels"] == [128, 0, 128] and row["dense"]["pixel_acc"] == pytest.approx(
        100 * (60 + 64) / 252, abs=0.01)
    check_figure(write_figure(examples, tmp_path))


def test_classification_and_class_names():
    classification = build_task("classification", 3)
    assert collect_examples(classification, Boxes(), FixedDetector()) is None  # classification runs: no figure
    assert class_names(Subset(Boxes(), [0]), 5) == ["cat", "dog", "fox", "3", "4"]
    assert class_names(Boxes(), 4, "segmentation") == ["background", "cat", "dog", "fox"]
    assert class_names(Masks(), 3, "segmentation") == ["0", "1", "2"]
    assert class_names(None, 2) == ["0", "1"]
