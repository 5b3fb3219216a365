"""Ultralytics YOLO detection models in compressor: the `[yolo]` extra (Ultralytics is AGPL-3.0; compressor imports it
only inside functions, in models/yolo*.py).

`ultralytics:yolo11n.yaml` builds a DetectionModel from its YAML (random weights; nothing is downloaded) and an
Ultralytics .pt checkpoint loads as one (models/loading.py); either is wrapped in a YOLODetector, which gives it
compressor's conventions: one input tensor; in eval mode one output tensor (N, 4 + classes, anchors), boxes as cx,
cy, w, h in input pixels then class probabilities, exactly what `yolo export format=onnx` writes (the Detect head
is set up as Ultralytics' exporter sets it, with a dynamic batch); in train mode the raw head outputs that
`detection_loss` takes. Split-and-concat blocks (C2f, C3k2, C2PSA, ...) are rewritten so that their channels prune
(models/yolo_blocks.py). `save_ultralytics` (models/yolo_checkpoint.py) writes the pruned model back in
Ultralytics' checkpoint format, so `ultralytics.YOLO(path)` predicts and validates with it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from types import ModuleType
from typing import Any

import torch
from torch import nn

from compressor.errors import ModelLoadError
from compressor.extras import require

EXTRA = ("ultralytics", "yolo", "Ultralytics YOLO models (AGPL-3.0)")


def import_ultralytics() -> ModuleType:
    """Ultralytics, offline (YOLO_OFFLINE: no connectivity probe, analytics or update check), or MissingExtra."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    return require(*EXTRA)


@contextlib.contextmanager
def quiet():
    """Ultralytics' info lines (model summaries, 'Overriding nc') off while it builds or loads a model."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_yolo(name: str, num_classes: int, in_channels: int) -> "YOLODetector":
    """A randomly initialised Ultralytics detection model from a model YAML (a shipped name such as yolo11n.yaml,
    or a path), with `num_classes` classes and `in_channels` input channels, wrapped in a YOLODetector."""
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    from compressor.models.yolo_yamls import load_detection_yaml

    cfg = load_detection_yaml(name)
    try:
        with quiet():
            model = DetectionModel(cfg, ch=in_channels, nc=num_classes, verbose=False)
    except Exception as exc:  # parse_model raises whatever a bad module list or argument makes it raise
        raise ModelLoadError(f"Ultralytics could not build {name} with {num_classes} classes and {in_channels} "
                             f"input channels ({type(exc).__name__}: {exc}).",
                             hint="Check the model YAML's backbone and head sections.") from exc
    return YOLODetector(model)


def wrap_ultralytics(model: nn.Module, label: str = "the checkpoint") -> "YOLODetector":
    """A YOLODetector around a DetectionModel loaded from an Ultralytics checkpoint: float32 and trainable (they
    are saved in half precision with every parameter frozen; the DFL projection stays frozen, as Ultralytics'
    trainer keeps it)."""
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    from compressor.models.yolo_yamls import DETECT_HEADS

    head = model.model[-1] if isinstance(model, DetectionModel) else None
    if head is None or type(head).__name__ not in DETECT_HEADS:
        kind = type(head if head is not None else model).__name__
        raise ModelLoadError(f"{label} holds an Ultralytics {type(model).__name__} ({kind}); compressor wraps "
                             f"Ultralytics detection models, whose head ({' or '.join(DETECT_HEADS)}) outputs boxes "
                             "and class scores.", hint="Load a detection checkpoint (yolo11n.pt-like).")
    model = model.float()
    dfl = {id(p) for p in head.dfl.parameters()} if isinstance(head.dfl, nn.Module) else set()
    for p in model.parameters():
        p.requires_grad_(id(p) not in dfl)
    return YOLODetector(model)


class YOLODetector(nn.Module):
    """An Ultralytics DetectionModel (`self.yolo`) with compressor's conventions (see the module docstring).

    A one-to-one (NMS-free) branch (YOLOv10, YOLO26) is dropped: compressor's detection task evaluates with NMS on
    the one-to-many outputs, which are what is trained, exported and saved."""

    output_layout = "yolo"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from ultralytics.cfg import DEFAULT_CFG_DICT
        from ultralytics.utils import IterableSimpleNamespace

        from compressor.models.yolo_blocks import make_prunable

        head = model.model[-1]
        if getattr(head, "one2one_cv2", None) is not None:
            with quiet():
                head.end2end = False
                head.fuse()  # with end2end off, fuse() removes the one-to-one branch
            model.yaml["end2end"] = False
        make_prunable(model)
        model.args = IterableSimpleNamespace(**DEFAULT_CFG_DICT)  # the loss gains (box, cls, dfl) it trains with
        head.export, head.format, head.dynamic, head.xyxy = True, "onnx", True, False  # as `yolo export format=onnx`
        self.yolo = model
        self.num_classes = int(head.nc)
        self.loss_items: dict[str, torch.Tensor] = {}  # the last detection_loss's components, detached
        self._criterion: tuple | None = None

    @property
    def head(self) -> nn.Module:
        """The Detect head (the last layer of the DetectionModel)."""
        return self.yolo.model[-1]

    def forward(self, x: torch.Tensor) -> Any:
        """Eval: (N, 4 + classes, anchors). Train: Ultralytics' raw head outputs, a dict of "boxes" (N, 4 * reg_max,
        anchors) box distributions, "scores" (N, classes, anchors) class logits and "feats" (the per-level maps)."""
        return self.yolo(x)

    def detection_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Ultralytics' v8DetectionLoss of train-mode `outputs` against BoxTargets: box + cls + dfl (each times its
        default gain) per image (Ultralytics' trainer backpropagates that sum times the batch size)."""
        if not isinstance(outputs, dict) or "boxes" not in outputs:
            raise TypeError(f"detection_loss takes the train-mode outputs of the model (a dict with boxes, scores "
                            f"and feats), not a {type(outputs).__name__}; call it on model.train() outputs.")
        criterion, device = self._loss_fn(), outputs["boxes"].device
        batch = {k: v.to(device) for k, v in targets.yolo_batch().items()}
        loss, items = criterion(outputs, batch)
        self.loss_items = items
        return loss.sum() / outputs["boxes"].shape[0]

    def _loss_fn(self):
        """v8DetectionLoss, built on first use and again whenever what it caches (the head, its strides and their
        device, classes, reg_max) is no longer the model's: after .to(device), or a head replaced."""
        from ultralytics.utils.loss import v8DetectionLoss

        head = self.head
        values = (int(head.nc), int(head.reg_max), next(self.parameters()).device)
        cached = self._criterion
        if cached is None or cached[0] is not head or cached[1] is not head.stride or cached[2] != values:
            self._criterion = cached = (head, head.stride, values, v8DetectionLoss(self.yolo))
        return cached[3]

    def protected_modules(self) -> list[str]:
        """Names of the layers never to prune: the head's final 1x1 convs (box distributions, 4 * reg_max outputs,
        and class scores, nc outputs: bare convs, not conv blocks), the DFL conv, and every conv of an attention
        block (C2PSA / PSA / A2C2f: their q/k/v channel split is tied to the head count)."""
        head = self.head
        prefix = next(name for name, m in self.named_modules() if m is head)
        outputs = {4 * int(head.reg_max), int(head.nc)}
        blocks = {id(m.conv) for m in head.modules() if isinstance(getattr(m, "conv", None), nn.Conv2d)}
        names = [f"{prefix}.{name}" for name, m in head.named_modules()
                 if isinstance(m, nn.Conv2d) and (name.startswith("dfl.") or (
                     id(m) not in blocks and m.kernel_size == (1, 1) and m.out_channels in outputs))]
        for name, m in self.named_modules():
            if hasattr(m, "num_heads") and any(isinstance(c, nn.Conv2d) for c in m.modules()):
                names += [f"{name}.{sub}" for sub, c in m.named_modules() if isinstance(c, nn.Conv2d)]
        return names

    def save_native(self, folder: str | os.PathLike, names: list[str], *, input_shape: tuple[int, ...] | None = None,
                    data: str | os.PathLike | None = None) -> dict[str, str]:
        """This model in Ultralytics' own checkpoint format, `folder`/ultralytics.pt (compress writes it into the
        run): `names` the classes, `input_shape` (C, H, W) the training size (Ultralytics' imgsz), `data` a dataset
        YAML that YOLO(path).val() then reads by default. Returns {"ultralytics": path}."""
        from pathlib import Path

        from compressor.models.yolo_checkpoint import save_ultralytics

        args: dict[str, Any] = {}
        if input_shape is not None:
            height, width = input_shape[-2:]
            args["imgsz"] = int(height) if height == width else [int(height), int(width)]
        if data is not None:
            args["data"] = str(Path(data).resolve())
        return {"ultralytics": str(save_ultralytics(self, Path(folder) / "ultralytics.pt", names=names,
                                                    train_args=args))}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_criterion"] = None  # rebuilt on first use; not part of a saved model
        return state
