"""Ultralytics YOLO detection models in compressor (compressor/models/yolo*.py): built from YAML offline, wrapped
to compressor's conventions, split-and-concat blocks rewritten so they prune, pruned through compressor's graph
code, exported to ONNX, saved back in Ultralytics' checkpoint format and loaded again (by Ultralytics and by
compressor). Tiny inputs (64x64, nc=10) keep every test on the CPU in seconds."""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is first imported: no connectivity probe
pytest.importorskip("ultralytics")

from compressor.deploy.config import OnnxConfig  # noqa: E402
from compressor.deploy.export import export_onnx  # noqa: E402
from compressor.deploy.verify import compare_outputs  # noqa: E402
from compressor.errors import ModelLoadError  # noqa: E402
from compressor.extras import MissingExtra  # noqa: E402
from compressor.models.loading import _from_object, build_arch, load_model  # noqa: E402
from compressor.models.config import ModelConfig  # noqa: E402
from compressor.models.yolo import YOLODetector, build_yolo  # noqa: E402
from compressor.models.yolo_blocks import SplitConv, make_prunable  # noqa: E402
from compressor.models.yolo_checkpoint import save_ultralytics  # noqa: E402
from compressor.prune import graph as dg  # noqa: E402
from compressor.prune import removal  # noqa: E402
from compressor.tasks.targets import BoxTargets  # noqa: E402

NC, SIZE = 10, 64
ANCHORS = sum((SIZE // s) ** 2 for s in (8, 16, 32))  # 84 at 64x64


@pytest.fixture(scope="module")
def dense() -> dict[str, YOLODetector]:
    """One dense model per YAML, built once; tests that change a model take a deepcopy."""
    return {name: build_arch(f"ultralytics:{name}", NC, 3) for name in ("yolo11n.yaml", "yolov8n.yaml")}


def images(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def targets(size: int = SIZE) -> BoxTargets:
    """Three images: one box, none, two boxes (x0, y0, x1, y1 pixels)."""
    return BoxTargets([torch.tensor([[5.0, 6.0, 30.0, 40.0]]), torch.zeros(0, 4),
                       torch.tensor([[1.0, 1.0, size - 4.0, size - 14.0], [10.0, 10.0, 20.0, 20.0]])],
                      [torch.tensor([3]), torch.zeros(0, dtype=torch.long), torch.tensor([1, 9])], (size, size))


def prune_30(model: YOLODetector, example: torch.Tensor) -> dict[str, list[int]]:
    """Remove the 30% lowest-L1 output channels of every prunable group (compressor's graph code, the head's
    predictors, DFL and attention protected), through compressor's removal; returns the plan."""
    ignored = dg.resolve_ignored(model, model.protected_modules(), example)
    graph = dg.build_graph(model, example, ignored)
    names = dg.module_names(model)
    plan = {}
    for group in dg.prunable_groups(graph, ignored):
        root = dg.describe_group(group, names).root
        weight = model.get_submodule(root).weight.detach()
        plan[root] = sorted(weight.flatten(1).abs().sum(1).argsort()[:int(0.3 * weight.shape[0])].tolist())
    removal.remove(model, example, plan)
    return plan


def widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------------------------------------- building
def test_eval_output_is_ultralytics_export_tensor_and_train_output_its_loss_input(dense):
    model = copy.deepcopy(dense["yolo11n.yaml"])
    assert isinstance(model, YOLODetector) and model.output_layout == "yolo" and model.num_classes == NC
    x = images(2)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4 + NC, ANCHORS)
    probs = out[:, 4:]
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1  # class probabilities, after the sigmoid
    # Ultralytics' own eval forward (not in export mode) returns (that tensor, raw outputs): the same numbers
    head = model.head
    head.export = False
    with torch.no_grad():
        reference, raw = model.yolo(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert set(raw) == {"boxes", "scores", "feats"}
    assert float(out[:, 2:4].min()) >= 0  # widths and heights (cx, cy, w, h in input pixels)
    train = model.train()(x)
    assert train["boxes"].shape == (2, 4 * head.reg_max, ANCHORS) and train["scores"].shape == (2, NC, ANCHORS)
    assert [tuple(f.shape[2:]) for f in train["feats"]] == [(8, 8), (4, 4), (2, 2)]


def test_split_blocks_give_identical_outputs_before_pruning():
    from ultralytics.nn.tasks import DetectionModel

    for name, kinds in (("yolo11n.yaml", {"C3k2", "C2PSA"}), ("yolov8n.yaml", {"C2f"})):
        torch.manual_seed(0)
        original = DetectionModel(name, nc=NC, verbose=False).eval()
        split = copy.deepcopy(original)
        replaced = make_prunable(split)
        before = {type(original.get_submodule(n)).__name__ for n in replaced}
        assert before == kinds, (name, before)
        assert all(isinstance(split.get_submodule(f"{n}.cv1"), SplitConv) for n in replaced)
        assert not any(type(m).__name__ in ("C2f", "C3k2", "C2PSA") for m in split.modules())
        x = images(2)
        with torch.no_grad():
            expected, got = original(x)[0], split(x)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_protected_modules_are_the_predictors_dfl_and_attention(dense):
    model = dense["yolo11n.yaml"]
    protected = model.protected_modules()
    head = "yolo.model.23"
    predictors = [f"{head}.cv2.{i}.2" for i in range(3)] + [f"{head}.cv3.{i}.2" for i in range(3)]
    assert set(predictors) | {f"{head}.dfl.conv"} <= set(protected)
    assert {model.get_submodule(n).out_channels for n in predictors} == {4 * model.head.reg_max, NC}
    attention = [n for n in protected if ".attn." in n]
    assert sorted(attention) == ["yolo.model.10.m.0.attn.pe.conv", "yolo.model.10.m.0.attn.proj.conv",
                                 "yolo.model.10.m.0.attn.qkv.conv"]
    # nothing else: the head's inner convs (64 outputs like the box predictors) stay prunable
    assert len(protected) == len(predictors) + 1 + len(attention)
    assert f"{head}.cv2.0.1.conv" not in protected


def test_unknown_and_non_detection_yamls_are_refused(tmp_path):
    with pytest.raises(ModelLoadError) as unknown:
        build_yolo("yolo11q.yaml", NC, 3)
    assert "yolo11q.yaml" in unknown.value.message and "yolo11{n,s,m,l,x}.yaml" in unknown.value.message
    assert "yolov8{n,s,m,l,x}.yaml" in unknown.value.message and "yolo11-seg" not in unknown.value.message
    with pytest.raises(ModelLoadError, match=r"segment model \(head Segment\)"):
        build_arch("ultralytics:yolo11n-seg.yaml", NC, 3)
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_yolo(str(tmp_path / "mine.yaml"), NC, 3)
    broken = tmp_path / "broken.yaml"
    broken.write_text("nc: 3\nbackbone: [[-1, 1, Conv, [16, 3, 2]]]\n")
    with pytest.raises(ModelLoadError, match="cannot read Ultralytics model YAML"):
        build_yolo(str(broken), NC, 3)


def test_missing_ultralytics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import ultralytics -> ImportError
    with pytest.raises(MissingExtra) as missing:
        build_yolo("yolo11n.yaml", NC, 3)
    assert "[yolo]" in missing.value.hint and "AGPL-3.0" in missing.value.message


# ---------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("height, width", [(SIZE, SIZE), (96, SIZE)])
def test_loss_is_ultralytics_loss_per_image(dense, height, width):
    model = copy.deepcopy(dense["yolov8n.yaml"]).train()
    x = torch.rand(3, 3, height, width, generator=torch.Generator().manual_seed(0))
    boxes = BoxTargets(targets().boxes, targets().labels, (height, width))
    outputs = model(x)
    loss = model.detection_loss(outputs, boxes)
    # Ultralytics' own loss on its batch dict (cx, cy, w, h over the image's width and height), written out here:
    # its components summed, times the batch size
    xyxy = torch.tensor([[5.0, 6.0, 30.0, 40.0], [1.0, 1.0, 60.0, 50.0], [10.0, 10.0, 20.0, 20.0]])
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    batch = {"batch_idx": torch.tensor([0.0, 2.0, 2.0]), "cls": torch.tensor([[3.0], [1.0], [9.0]]),
             "bboxes": torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / scale}
    expected, items = model.yolo.loss(batch, outputs)
    torch.testing.assert_close(loss, expected.sum() / 3)
    assert set(model.loss_items) == {"box_loss", "cls_loss", "dfl_loss"}
    torch.testing.assert_close(loss.detach(), sum(model.loss_items.values()))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(model.head.cv3[0][2].weight.grad.abs().sum()) > 0
    with pytest.raises(TypeError, match="train-mode outputs"):
        model.detection_loss(model.eval()(x), boxes)


def test_cached_loss_follows_the_head_and_its_strides(dense):
    model = copy.deepcopy(dense["yolo11n.yaml"])
    first = model._loss_fn()
    assert model._loss_fn() is first and first.stride is model.head.stride
    model.head.stride = model.head.stride.clone()  # what .to(device) does (DetectionModel._apply)
    second = model._loss_fn()
    assert second is not first and second.stride is model.head.stride
    twin = copy.deepcopy(model)  # a copy (a teacher, a DDP replica) builds its own, on its own head
    assert twin._loss_fn().stride is twin.head.stride and twin._loss_fn() is not second


# ---------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("name", ["yolo11n.yaml", "yolov8n.yaml"])
def test_prune_30_percent_then_train_eval_loss_and_onnx(dense, name, tmp_path):
    import onnxruntime

    model = copy.deepcopy(dense[name])
    x, boxes = images(3), targets()
    model.train()
    loss_before = model.detection_loss(model(x), boxes)  # builds the cached loss before the structure changes
    before = widths(model)
    plan = prune_30(model, images(1))
    after = widths(model)
    # the split-and-concat internals were pruned: both halves of cv1, the inner bottlenecks
    split_roots = [r for r in plan if ".cv1.parts." in r]
    inner = [r for r in plan if ".m.0." in r]
    assert len(split_roots) >= 8 and len(inner) >= 8, (split_roots, inner)
    for root in split_roots + inner:
        assert after[root] == before[root] - int(0.3 * before[root]), root
    assert sum(after.values()) < 0.8 * sum(before.values())
    for protected in model.protected_modules():
        assert after[protected] == before[protected], protected

    with torch.no_grad():
        reference = model.eval()(x)
    assert reference.shape == (3, 4 + NC, ANCHORS) and torch.isfinite(reference).all()
    model.train()
    loss = model.detection_loss(model(x), boxes)
    assert torch.isfinite(loss) and float(loss.detach()) != float(loss_before.detach())
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
    model._criterion = None  # a loss built afresh on the pruned model gives the same value: the cache stayed valid
    torch.testing.assert_close(model.detection_loss(model(x), boxes), loss)

    with torch.no_grad():
        reference = model.eval()(x)  # again: the train-mode passes above moved the batch-norm statistics
    result = export_onnx(model, images(1), tmp_path / "pruned.onnx", OnnxConfig())
    assert result["dynamic_batch"]
    session = onnxruntime.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    parity = compare_outputs(reference.numpy(), onnx_out)
    assert onnx_out.shape == (3, 4 + NC, ANCHORS) and parity["relative_diff"] <= 1e-4, parity


def test_pruned_model_saves_and_reloads_as_a_slim_model(dense, tmp_path):
    """compressor's own format: slim.json + safetensors, rebuilt from the reference and resized to the widths."""
    from compressor.models.slim import load_slim, save_slim

    model = copy.deepcopy(dense["yolo11n.yaml"])
    prune_30(model, images(1))
    cfg = ModelConfig(arch="ultralytics:yolo11n.yaml", num_classes=NC, in_channels=3, input_shape=[3, SIZE, SIZE])
    assert isinstance(load_model(cfg.arch, cfg), YOLODetector)  # the reference passes load_model's checks
    save_slim(model, tmp_path / "slim", cfg)
    fresh = load_slim(tmp_path / "slim")
    assert isinstance(fresh, YOLODetector) and widths(fresh) == widths(model)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- checkpoints
def tiny_dataset(root) -> str:
    """Four 64x64 images with one rectangle each and their YOLO labels; an Ultralytics dataset YAML."""
    from PIL import Image

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((SIZE, SIZE, 3), 90, np.uint8)
            pixels[10 + i:40, 12:50 - i] = (200, 40 * i, 30)
            Image.fromarray(pixels).save(root / "images" / split / f"{i}.png")
            cx, cy, w, h = (12 + 50 - i) / 2 / SIZE, (10 + i + 40) / 2 / SIZE, (38 - i) / SIZE, (30 - i) / SIZE
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % NC} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    names = "".join(f"  {i}: c{i}\n" for i in range(NC))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return str(root / "data.yaml")


def test_save_ultralytics_loads_in_ultralytics_and_compressor(dense, tmp_path, monkeypatch):
    from ultralytics import YOLO

    model = copy.deepcopy(dense["yolo11n.yaml"])
    prune_30(model, images(1))
    pruned = widths(model)
    path = save_ultralytics(model, tmp_path / "pruned.pt", names=[f"c{i}" for i in range(NC)],
                            train_args={"imgsz": SIZE}, compressor={"pruned": True})
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["model"].model[0].conv.weight.dtype == torch.float16
    assert checkpoint["train_args"]["imgsz"] == SIZE and checkpoint["compressor"] == {"pruned": True}
    assert {"date", "version", "license", "docs", "train_args"} <= set(checkpoint)
    assert model.head.export and model.yolo.model[0].conv.weight.dtype == torch.float32  # the wrapper is untouched

    # Ultralytics: same pruned widths, same predictions as the wrapper with its weights rounded to half precision
    yolo = YOLO(str(path))
    assert {name[len("yolo."):]: w for name, w in pruned.items()} == widths(yolo.model)
    assert yolo.names == {i: f"c{i}" for i in range(NC)}
    rounded = copy.deepcopy(model).half().float().eval()
    x = images(2)
    with torch.no_grad():
        theirs = yolo.model.eval()(x)[0]
        ours = rounded(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)
    frame = (images(1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    (result,) = yolo.predict(frame, imgsz=SIZE, conf=0.0, device="cpu", verbose=False)
    assert 0 < len(result.boxes) <= 300 and float(result.boxes.xyxy.max()) <= SIZE
    monkeypatch.setattr("ultralytics.data.utils.check_font", lambda *a, **k: None)  # no font download
    metrics = yolo.val(data=tiny_dataset(tmp_path / "data"), imgsz=SIZE, batch=2, device="cpu", workers=0,
                       plots=False, verbose=False, project=str(tmp_path / "runs"), name="val")
    assert 0.0 <= float(metrics.box.map) <= 1.0

    # compressor: the checkpoint (a pickle: --trust-checkpoint) loads as a float32 YOLODetector with those widths
    cfg = ModelConfig(num_classes=NC, in_channels=3, input_shape=[3, SIZE, SIZE])
    with pytest.raises(ModelLoadError, match="pickled Python object"):
        load_model(path, cfg)
    loaded = load_model(path, cfg, trust_checkpoint=True)
    assert isinstance(loaded, YOLODetector) and widths(loaded) == pruned
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert all(p.requires_grad for n, p in loaded.named_parameters() if ".dfl." not in n)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), ours, rtol=0, atol=0)
    # Ultralytics' mid-training checkpoints hold the model under "ema" (their "model" is None)
    mid = _from_object({**checkpoint, "model": None, "ema": checkpoint["model"]}, cfg)
    assert isinstance(mid, YOLODetector) and widths(mid) == pruned


def test_stock_ultralytics_checkpoint_loads_as_a_prunable_detector(tmp_path):
    """A checkpoint as Ultralytics' trainer writes it (half-precision DetectionModel with Ultralytics' own C3k2 /
    C2PSA blocks, frozen parameters): loaded by compressor it is a float32, trainable YOLODetector whose split
    blocks are rewritten, with the same outputs."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    stock = DetectionModel("yolo11n.yaml", nc=NC, verbose=False).half().eval()
    for p in stock.parameters():
        p.requires_grad_(False)
    torch.save({"model": stock, "ema": None, "train_args": {"imgsz": SIZE}, "version": "8.4.0"}, tmp_path / "best.pt")
    cfg = ModelConfig(num_classes=NC, in_channels=3, input_shape=[3, SIZE, SIZE])
    loaded = load_model(tmp_path / "best.pt", cfg, trust_checkpoint=True)
    assert isinstance(loaded, YOLODetector) and loaded.num_classes == NC
    assert sum(isinstance(m, SplitConv) for m in loaded.modules()) == 9  # 8 C3k2 + 1 C2PSA
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == ["yolo.model.23.dfl.conv.weight"]
    x = images(2)
    with torch.no_grad():
        expected = stock.float()(x)[0]
        torch.testing.assert_close(loaded.eval()(x), expected, rtol=1e-5, atol=1e-4)
