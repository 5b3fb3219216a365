"""Every structured pruning method compressor registers (and DPM around every registered host) on a detector and a
segmenter, through the same training loop compress uses (`fit` with the recipe's task): the MAC target met, widths
on round_to, the model's protected predictors keeping their width, the eval outputs keeping their shape (a YOLO
detector (N, 4+C, A) with the same anchors, a segmenter (N, C, H, W)), the task's loss finite and its metric
computed. The classifier counterpart is test_method_invariants.py; a new method or host is covered when it
registers. Tiny on purpose (64x64 scenes, 16 training images, 2 epochs of 2 steps) so every case runs in seconds;
the dense model's MACs and output shapes are measured once per model."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is first imported: no connectivity probe

from compressor.app.recipe import recipe_from_dict  # noqa: E402
from compressor.models.loading import build_arch, example_inputs  # noqa: E402
from compressor.prune.methods import HOSTS, METHODS  # noqa: E402
from compressor.prune.op_count import snapshot_macs  # noqa: E402
from compressor.prune.planning import MISS_TOLERANCE, relative_miss  # noqa: E402
from compressor.tasks.base import as_tensors  # noqa: E402
from compressor.train.data import build_datasets  # noqa: E402
from compressor.train.loop import fit  # noqa: E402
from tests.conftest import requires_fmnist  # noqa: E402
from tests.method_settings import HOST_SETTINGS, METHOD_SETTINGS, ROUND  # noqa: E402
from tests.task_runs import SIZE as TASK_SIZE  # noqa: E402

pytestmark = requires_fmnist
pytest.importorskip("ultralytics")
pytest.importorskip("torchmetrics")

SIZE, TARGET = 64, 0.6
# test_method_invariants' settings where they fit 2 epochs of 2 optimizer steps; DPM decays in 2 steps of 1 so both
# events' structures are removed inside the 4 steps (its shared setting waits 9 steps for the second event's)
SETTINGS = {**METHOD_SETTINGS, "dpm": {"dpm": {"steps": 2, "interval": 1}}}
# DPM around the other hosts runs one event: what those cases add is the host's scores and regulariser on a task
# model; DPM's two events (a second selection on the pruned model) are the default host's case. Each event re-traces
# and re-plans the model (a second or two on YOLO11n): the bulk of a case's time, not its 64x64 training steps.
HOST_EVENTS = 1


@dataclass(frozen=True)
class TaskModel:
    task: str
    arch: str
    num_classes: int
    kind: str


MODELS = {
    "yolo11n": TaskModel("detection", "ultralytics:yolo11n.yaml", 10, "yolo"),
    "lraspp": TaskModel("segmentation", "torchvision:lraspp_mobilenet_v3_large", 11, "masks"),
    "ssdlite": TaskModel("detection", "torchvision:ssdlite320_mobilenet_v3_large", 10, "coco"),
}


def _removes_channels(name: str, host: str) -> bool:
    """The method, with its settings here, removes channels physically (a MAC target applies)."""
    recipe = recipe_from_dict(task_recipe(MODELS["yolo11n"], Path("."), name, host))
    return not METHODS.get(name).keeps_dense_shapes(recipe.prune)


def task_recipe(spec: TaskModel, scenes: Path, method: str, host: str = "depgraph") -> dict:
    data = {"kind": spec.kind, "root": str(scenes), "batch_size": 8, "augment": False}
    if spec.kind == "yolo":
        data["yolo"] = str(scenes / "data.yaml")
    recipe = {"name": f"{spec.task}-{method}", "task": spec.task,
            "model": {"arch": spec.arch, "num_classes": spec.num_classes, "input_shape": [3, SIZE, SIZE]},
            "data": data,
            "prune": {"method": method, "host": host, "target": {"macs": TARGET}, "round_to": ROUND,
                      "schedule": {"events": 2, "end_epoch": 2}, **SETTINGS.get(method, {}),
                      **HOST_SETTINGS.get(host, {})},
            "finetune": {"epochs": 2, "optimizer": {"kind": "adamw", "lr": 0.001},
                         "bn_recalibration": {"batches": 2}}}
    if method == "dpm" and host != "depgraph":  # see HOST_EVENTS
        recipe["prune"]["schedule"] = {**recipe["prune"]["schedule"], "events": HOST_EVENTS}
    return recipe


ALL = [(n, "depgraph") for n in METHODS.names()] + [("dpm", h) for h in HOSTS.names() if h != "depgraph"]
STRUCTURED = [(n, h) for n, h in ALL if _removes_channels(n, h)]
CASES = [pytest.param(m, n, h, id=f"{m}-{n}" + (f"@{h}" if h != "depgraph" else ""))
         for m in ("yolo11n", "lraspp") for n, h in STRUCTURED] + [pytest.param("ssdlite", "oneshot", "depgraph",
                                                                             id="ssdlite-oneshot")]


@pytest.fixture(scope="module")
def scenes(task_scenes) -> Path:
    """The session's 64x64 scenes, 16 training and 8 validation images (tests/task_runs.py)."""
    assert SIZE == TASK_SIZE
    return task_scenes


@dataclass
class Dense:
    model: nn.Module
    train: object
    val: object
    batch: tuple  # 4 validation images and their targets
    macs: float  # of the model at the recipe's input size
    shapes: list  # of its eval outputs on the batch


@pytest.fixture(scope="module")
def dense(scenes):
    """Per model, built and measured once: the dense model, its datasets, a probe batch with its targets, its MACs
    and its eval outputs' shapes (each case takes a deepcopy of the model)."""
    built = {}

    def get(key: str) -> Dense:
        if key not in built:
            spec = MODELS[key]
            recipe = recipe_from_dict(task_recipe(spec, scenes, "oneshot"))
            torch.manual_seed(0)
            model = build_arch(spec.arch, spec.num_classes, 3)
            train, val = build_datasets(recipe.data, recipe.model)
            x, targets = getattr(val, "collate", default_collate)([val[i] for i in range(4)])
            macs = snapshot_macs(model, example_inputs(recipe.model))[0]
            with torch.no_grad():
                shapes = [t.shape for t in as_tensors(model.eval()(x))]
            built[key] = Dense(model, train, val, (x, targets), macs, shapes)
        return built[key]

    return get


def conv_shapes(model: nn.Module, names) -> dict[str, tuple[int, ...]]:
    return {n: tuple(model.get_submodule(n).weight.shape) for n in names}


def test_every_structured_method_and_host_is_a_case():
    """The enumeration is not empty by accident: the channel-removing methods and every DPM host are here."""
    names = {n for n, _ in STRUCTURED}
    assert {"oneshot", "iterative", "fggp", "ocsp", "dpm"} <= names
    assert {h for n, h in STRUCTURED if n == "dpm"} == set(HOSTS.names())
    assert ("none", "depgraph") not in STRUCTURED


@pytest.mark.parametrize("key, name, host", CASES)
def test_structured_method_on_a_task_model(key, name, host, scenes, dense):
    spec = MODELS[key]
    recipe = recipe_from_dict(task_recipe(spec, scenes, name, host))
    task = recipe.build_task()
    base = dense(key)
    (x, targets), dense_macs, dense_shapes = base.batch, base.macs, base.shapes
    model = copy.deepcopy(base.model)
    example = example_inputs(recipe.model)
    protected = model.protected_modules()
    assert protected and set(protected) <= {n for n, _ in model.named_modules()}
    dense_protected = conv_shapes(model, protected)
    dense_widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    result = fit(model, base.train, base.val, recipe.finetune, recipe.data,
                 method=METHODS.get(name)(recipe.prune_spec()), task=task, evaluate_every_epoch=False)
    model.eval()

    # the MAC target, and the pruned widths on multiples of round_to
    macs = snapshot_macs(model, example)[0]
    assert abs(relative_miss(macs / dense_macs, TARGET)) <= MISS_TOLERANCE, macs / dense_macs
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    changed = {n: w for n, w in widths.items() if w != dense_widths[n]}
    assert changed and all(w % ROUND == 0 for w in changed.values()), {n: w for n, w in changed.items() if w % ROUND}

    # the predictors (box / class convolutions, DFL, the segmenter's class convolutions) keep their width
    after = conv_shapes(model, protected)
    assert {n: s[0] for n, s in after.items()} == {n: s[0] for n, s in dense_protected.items()}
    assert not set(protected) & set(changed)

    # the eval outputs keep their shape (same anchors, same classes, same pixels) and are finite
    with torch.no_grad():
        outputs = as_tensors(model(x))
    assert [t.shape for t in outputs] == dense_shapes
    assert all(torch.isfinite(t).all() for t in outputs)
    if key == "yolo11n":
        anchors = sum((SIZE // s) ** 2 for s in (8, 16, 32))
        assert dense_shapes == [(4, 4 + spec.num_classes, anchors)]
    elif key == "lraspp":
        assert dense_shapes == [(4, spec.num_classes, SIZE, SIZE)]

    # the task's loss on a batch of the pruned model is finite and has gradients
    model.train()
    loss = task.loss(model, x, targets)
    assert loss.dim() == 0 and torch.isfinite(loss), float(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()

    # the task's metrics of the last epoch's validation (mAP50-95 and mAP50, or mIoU and pixel accuracy)
    metrics = {k: result.final.get(f"val_{k}") for k, _, _ in task.columns if k != "loss"}
    assert task.primary in metrics and all(v is not None and 0.0 <= v <= 100.0 for v in metrics.values()), metrics
