"""The session's shared detection / segmentation compress runs (fixtures imported by tests/conftest.py): one tiny
run per model on 64x64 scenes (16 training, 8 validation images, one epoch, oneshot to 0.6 MACs), run through the
CLI in-process on first use and read by test_task_cli.py, test_task_report.py and test_nms_export.py. Each compress
of YOLO11n, SSDlite or LRASPP takes some 10 s on a CPU; the files used to run their own, with settings that differed
only where a test did not look, so one run carries the union of what they check (YOLO11n: export.nms and bench
batches 1 and 2; all: 8 verification samples). A test that needs another setting keeps its own, smaller run."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Callable

import pytest

SIZE, TRAIN, VAL = 64, 16, 8


@dataclass(frozen=True)
class TaskModel:
    reference: str
    task: str
    num_classes: int
    kind: str  # the data kind
    primary: str
    label: str


TASK_MODELS = {
    "yolo11n": TaskModel("ultralytics:yolo11n.yaml", "detection", 10, "yolo", "map50_95", "mAP50-95"),
    "ssdlite": TaskModel("torchvision:ssdlite320_mobilenet_v3_large", "detection", 10, "coco", "map50_95",
                         "mAP50-95"),
    "lraspp": TaskModel("torchvision:lraspp_mobilenet_v3_large", "segmentation", 11, "masks", "miou", "mIoU"),
}

# YOLO11n's run also exports model.nms.onnx (test_nms_export.py): these settings, and two bench batch sizes
NMS = {"enabled": True, "conf": 0.001, "iou": 0.5, "max_det": 30}
BENCH = {"backends": ["ort-cpu"], "batch_sizes": [1], "min_runs": 3, "min_seconds": 0.05, "warmup_ms": 10}


def task_recipe(model: TaskModel, scenes: Path, **prune) -> dict:
    """The shared runs' recipe for `model` (also what test_task_cli.py's bad-data cases run with)."""
    data = {"kind": model.kind, "root": str(scenes), "batch_size": 8}
    if model.kind == "yolo":
        data["yolo"] = str(scenes / "data.yaml")
    return {"name": f"{model.task}-smoke", "task": model.task,
            "model": {"num_classes": model.num_classes, "input_shape": [3, SIZE, SIZE]}, "data": data,
            "prune": prune or {"method": "oneshot", "target": {"macs": 0.6}},
            "finetune": {"epochs": 1, "optimizer": {"kind": "adamw", "lr": 0.001}},
            "verify": {"samples": VAL}, "bench": dict(BENCH)}


def shared_recipe(key: str, scenes: Path) -> dict:
    recipe = task_recipe(TASK_MODELS[key], scenes)
    if key == "yolo11n":
        recipe["export"] = {"nms": dict(NMS)}
        recipe["bench"]["batch_sizes"] = [1, 2]
    return recipe


@dataclass(frozen=True)
class TaskRun:
    out: Path  # the run directory
    recipe_file: Path
    recipe: dict
    result: CompletedProcess  # the CLI's exit code, stdout and stderr
    report: dict | None  # what compressor.app.pipeline.compress returned to the CLI (None if it raised)


@pytest.fixture(scope="session")
def task_scenes(tmp_path_factory) -> Path:
    """64x64 scenes, 16 training and 8 validation images: read only (test_task_cli.py's `broken` copies them)."""
    from tests.conftest import FMNIST_DIR

    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from compressor.datasets.scenes import write_scenes

    out = tmp_path_factory.mktemp("task-scenes")
    write_scenes(out, train=TRAIN, val=VAL, size=SIZE, fmnist_root=FMNIST_DIR)
    return out


@pytest.fixture(scope="session")
def task_run(task_scenes, tmp_path_factory) -> Callable[[str], TaskRun]:
    """task_run(key): the one `compressor compress` of TASK_MODELS[key] this session, run on first use."""
    import yaml

    from compressor.app import pipeline
    from tests.conftest import invoke_cli

    done: dict[str, TaskRun] = {}

    def get(key: str) -> TaskRun:
        if key not in done:
            os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is first imported
            pytest.importorskip("ultralytics" if key == "yolo11n" else "torchmetrics")
            root = tmp_path_factory.mktemp(f"run-{key}")
            recipe = shared_recipe(key, task_scenes)
            recipe_file = root / "recipe.yaml"
            recipe_file.write_text(yaml.safe_dump(recipe))
            returned = {}

            def recording(*args, **kwargs):
                returned["report"] = real(*args, **kwargs)
                return returned["report"]

            real = pipeline.compress
            with pytest.MonkeyPatch.context() as patch:  # the CLI imports compress from the module when it runs
                patch.setattr(pipeline, "compress", recording)
                result = invoke_cli("compress", TASK_MODELS[key].reference, "--recipe", recipe_file, "--out",
                                    root / "run")
            done[key] = TaskRun(root / "run", recipe_file, recipe, result, returned.get("report"))
        return done[key]

    return get


def copy_scenes(scenes: Path, out: Path) -> Path:
    """A private copy of a scenes set (to break in a test); its data.yaml's path points at the copy."""
    shutil.copytree(scenes, out)
    (out / "data.yaml").write_text((scenes / "data.yaml").read_text().replace(str(scenes.resolve()),
                                                                              str(out.resolve())))
    return out
