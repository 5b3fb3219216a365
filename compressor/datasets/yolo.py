"""kind: yolo, an Ultralytics dataset YAML (path, train, val, names) over folders of images and YOLO label files.

The rules are Ultralytics': `train`/`val` are image folders (or lists of them) relative to `path`, or absolute;
`path` itself, when relative, is taken from the YAML's folder (else the working directory); an image's label file is
its path with the last `/images/` component replaced by `/labels/` and the extension by `.txt`, one object per line
as `class cx cy w h` (normalised to [0, 1], class ids 0-based). An image without a label file has no objects; a
label file without an image is an error (a renamed or deleted image would silently lose its boxes).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from compressor.datasets.images import (PAIRED_SUFFIXES, BoxImages, BoxRecord, check_box, image_size, list_images,
                                        locate)
from compressor.errors import DataError

if TYPE_CHECKING:
    from compressor.train.config import DataConfig

IGNORED_LABEL_FILES = ("classes.txt",)  # written next to the labels by labelling tools; not a label file


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ path component becomes /labels/, the extension .txt."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(os.fspath(image).rsplit(images, 1)).rsplit(".", 1)[0] + ".txt")


def yolo_datasets(cfg: "DataConfig", *, num_classes: int, shape: Sequence[int], roots: Sequence[Path]
                  ) -> tuple[BoxImages, BoxImages]:
    """(train, val) of the data.yolo dataset YAML (default data.root/data.yaml), both validated."""
    path = locate(cfg.yolo, "data.yolo", "data.yaml", roots, folder=False, what="an Ultralytics dataset YAML")
    spec = load_yaml(path)
    names = class_names(spec, path)
    if len(names) > num_classes:
        raise DataError(f"{path} names {len(names)} classes but model.num_classes is {num_classes}.",
                        hint=f"Set model.num_classes to {len(names)} (or more), or fix the names.")
    base = dataset_root(spec, path)
    train = read_yolo(image_folders(spec, "train", base, path), names, num_classes, shape, augment=cfg.augment)
    val = read_yolo(image_folders(spec, "val", base, path), names, num_classes, shape, augment=False)
    return train, val


def load_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.yolo: {path} cannot be read ({type(exc).__name__}: {exc}).",
                        hint="Give a readable UTF-8 Ultralytics dataset YAML.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"data.yolo: {path}{at} is not valid YAML ({getattr(exc, 'problem', None) or exc}).",
                        hint="Fix the file (keys path, train, val, names).") from None
    if not isinstance(data, dict):
        raise DataError(f"data.yolo: {path} is not a YAML mapping (keys path, train, val, names).",
                        hint="Write an Ultralytics dataset YAML: path, train, val, names.")
    return data


def class_names(spec: dict, path: Path) -> list[str]:
    """`names` as a list (a list, or a mapping of ids 0..n-1), or class_0.. from `nc`."""
    names, nc = spec.get("names"), spec.get("nc")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"data.yolo: {path} names has ids {sorted(names, key=str)}; they must be "
                            f"0..{len(names) - 1}.",
                            hint="Number the names 0, 1, 2, ... without gaps.")
        names = [names[i] for i in range(len(names))]
    elif names is None and isinstance(nc, int) and nc > 0:
        names = [f"class_{i}" for i in range(nc)]
    if not isinstance(names, list) or not names:
        raise DataError(f"data.yolo: {path} has no class names (a 'names' list or mapping, or 'nc').",
                        hint="Add names: {0: first, 1: second, ...}.")
    if nc is not None and nc != len(names):
        raise DataError(f"data.yolo: {path} has nc: {nc} but {len(names)} names.", hint="Make them agree.")
    return [str(n) for n in names]


def dataset_root(spec: dict, path: Path) -> Path:
    given = spec.get("path")
    if given is None:
        return path.parent
    root = Path(str(given)).expanduser()
    tried = [root] if root.is_absolute() else [path.parent / root, root]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise DataError(f"data.yolo: {path} has path: {given}, which is not a folder (looked for "
                    f"{', '.join(str(t) for t in tried)}).",
                    hint="Set path to the dataset's folder (absolute, or relative to the YAML's folder).")


def image_folders(spec: dict, split: str, base: Path, path: Path) -> list[Path]:
    value = spec.get(split)
    values = value if isinstance(value, list) else [value]
    if value is None or not all(isinstance(v, str) and v for v in values):
        raise DataError(f"data.yolo: {path} has no {split!r} image folder (got {value!r}).",
                        hint=f"Add {split}: images/{split} (relative to path) to the YAML.")
    folders = []
    for v in values:
        folder = Path(v).expanduser()
        folder = folder if folder.is_absolute() else base / folder
        if not folder.is_dir():
            kind = "an image list file, which compressor does not read" if folder.is_file() else "not a folder"
            raise DataError(f"data.yolo: {path} {split}: {v} is {kind} ({folder}).",
                            hint=f"Point {split} at a folder of images (relative to path: {base}, or absolute).")
        folders.append(folder)
    return folders


def _where(file: Path, line: int) -> str:
    return f"{file} line {line}"


def read_labels(file: Path, width: int, height: int, names: list[str], num_classes: int) -> tuple[list, list]:
    """The boxes (x0, y0, x1, y1 pixels, clipped) and 0-based classes of one label file, every line validated."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"label file {file} cannot be read ({type(exc).__name__}: {exc}).",
                        hint="Replace it with a UTF-8 text file of 'class cx cy w h' lines.") from None
    fix = ("Each line is 'class cx cy w h': a 0-based class id and the box's centre and size divided by the image's "
           "width/height.")
    boxes, labels = [], []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = _where(file, number)
        if len(parts) != 5:
            extra = " (a polygon label? compressor reads boxes only)" if len(parts) > 5 else ""
            raise DataError(f"{where}: {line.strip()!r} has {len(parts)} values, not 5{extra}.", hint=fix)
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise DataError(f"{where}: {line.strip()!r} is not five numbers.", hint=fix) from None
        cls, cx, cy, w, h = values
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{where}: {line.strip()!r} has a value that is not finite.", hint=fix)
        if not cls.is_integer() or cls < 0:
            raise DataError(f"{where}: class {parts[0]!r} is not a non-negative integer.", hint=fix)
        if cls >= len(names) or cls >= num_classes:
            raise DataError(f"{where}: class {int(cls)} is not below the number of classes ({len(names)} names in the "
                            f"dataset YAML, model.num_classes {num_classes}).",
                            hint="Fix the class id, or add the class to names (and raise model.num_classes).")
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            raise DataError(f"{where}: coordinates {' '.join(parts[1:])} are not all in [0, 1].",
                            hint=fix + " Pixel coordinates must be divided by the image size.")
        box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        check_box(box, width, height, f"{where} ({width}x{height} image)", fix)
        boxes.append([max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3])])
        labels.append(int(cls))
    return boxes, labels


def read_yolo(folders: list[Path], names: list[str], num_classes: int, shape: Sequence[int], *,
              augment: bool) -> BoxImages:
    """Read and validate one split: every label line, and no label file without its image."""
    records: list[BoxRecord] = []
    for folder in folders:
        images = list_images(folder)
        if not images:
            raise DataError(f"data.yolo: {folder} holds no images ({', '.join(PAIRED_SUFFIXES[:7])}).",
                            hint="Point the dataset YAML's train/val at folders of images.")
        expected = {label_path(image): image for image in images}
        label_dir = label_path(folder / "x.png").parent
        found = sorted(p for p in label_dir.rglob("*.txt") if p.name not in IGNORED_LABEL_FILES) \
            if label_dir.is_dir() else []
        if not found:
            raise DataError(f"data.yolo: no label files for the {len(images)} images in {folder} (looked in "
                            f"{label_dir}, the images folder's path with its last /images/ replaced by /labels/).",
                            hint="Put the .txt label files there (one per image, same stem).")
        orphans = [p for p in found if p not in expected]
        if orphans:
            raise DataError(f"label file {orphans[0]} has no image: no {orphans[0].stem}.* image in "
                            f"{folder / orphans[0].parent.relative_to(label_dir)}"
                            f"{f' ({len(orphans)} such label files)' if len(orphans) > 1 else ''}.",
                            hint="Restore the image, or delete the label file.")
        for file, image in expected.items():
            width, height = image_size(image)
            boxes, labels = read_labels(file, width, height, names, num_classes) if file.is_file() else ([], [])
            records.append(BoxRecord(image, width, height, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                     np.asarray(labels, dtype=np.int64)))
    return BoxImages(records, shape, names, augment=augment)
