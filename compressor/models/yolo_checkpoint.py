"""A (pruned) YOLODetector saved in Ultralytics' checkpoint format, so `ultralytics.YOLO(path)` loads it and its
predict / val / export / train run on the pruned widths.

The file is what Ultralytics' trainer leaves after training (its strip_optimizer): a dict whose "model" is the
DetectionModel in half precision with frozen parameters and `args` a plain dict, plus the keys its loader reads
(train_args, date, version, license, docs; epoch -1 and no optimizer, EMA or scaler). The model keeps compressor's
split-and-concat blocks (models/yolo_blocks.py: their halves may have different widths after pruning, which
Ultralytics' own blocks cannot express), so loading it needs compressor importable; with ULTRALYTICS_SAFE_LOAD set,
Ultralytics refuses classes outside its allow-list, these included.
"""
from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from compressor.models.yolo import YOLODetector, import_ultralytics
from compressor.rundir import atomic_path

EXPORT_SETTINGS = ("export", "format", "dynamic", "xyxy", "shape", "anchors", "strides")  # back to Ultralytics'


def save_ultralytics(wrapper: YOLODetector, path: str | Path, **meta: Any) -> Path:
    """Write `wrapper`'s DetectionModel to `path` (written atomically) as an Ultralytics checkpoint.

    `meta`: `names` (a list, or a {class index: name} dict) names the classes Ultralytics reports; `train_args`
    (a dict) goes over Ultralytics' default training arguments (e.g. data, imgsz), which its loader reads back as
    the model's arguments; every other key is stored as a top-level key of the checkpoint (e.g. compressor's
    report)."""
    ultralytics = import_ultralytics()
    from ultralytics.cfg import DEFAULT_CFG_DICT

    names = meta.pop("names", None)
    model = copy.deepcopy(wrapper.yolo).cpu()
    head = model.model[-1]
    for attr in EXPORT_SETTINGS:  # instance settings of the export-mode head: Ultralytics' class defaults again
        head.__dict__.pop(attr, None)
    if names is not None:
        model.names = _names(names, wrapper.num_classes)
    train_args = {**DEFAULT_CFG_DICT, "task": "detect", "model": model.yaml.get("yaml_file"),
                  **dict(meta.pop("train_args", None) or {})}
    model.args = dict(train_args)
    model.criterion = None
    model.half()
    for p in model.parameters():
        p.requires_grad_(False)
    checkpoint = {
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1, "best_fitness": None, "model": model, "ema": None, "updates": None, "optimizer": None,
        "scaler": None, "stopper": None, "train_args": train_args,
        **meta,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def _names(names: Sequence[str] | Mapping[int, str], num_classes: int) -> dict[int, str]:
    table = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
    if sorted(table) != list(range(num_classes)):
        raise ValueError(f"names must name the model's {num_classes} classes 0..{num_classes - 1}; got {len(table)}")
    return {int(k): str(v) for k, v in table.items()}
