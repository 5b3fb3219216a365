"""kind: coco, COCO detection JSON (images, annotations with bbox [x, y, w, h] in pixels, categories) plus a folder of
images.

Category ids map to 0-based classes in the order of the categories list (the scenes' ids 1..10 become 0..9); the
dataset keeps the mapping (`category_ids[class] = COCO id`) so predictions can be written back as COCO results.
Crowd annotations (iscrowd 1) are skipped, as detection training usually does. Every image entry is a sample, one
without annotations included (no objects: K = 0).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from compressor.datasets.images import BoxImages, BoxRecord, check_box, image_size, locate
from compressor.errors import DataError

if TYPE_CHECKING:
    from compressor.train.config import DataConfig

DEFAULTS = {"train_images": "images/train", "train_annotations": "annotations/instances_train.json",
            "val_images": "images/val", "val_annotations": "annotations/instances_val.json"}


class CocoImages(BoxImages):
    """A COCO detection set; `category_ids[i]` is the COCO category id of class i, `classes[i]` its name."""

    def __init__(self, records: list[BoxRecord], shape: Sequence[int], classes: list[str], category_ids: list[int],
                 *, augment: bool = False) -> None:
        super().__init__(records, shape, classes, augment=augment)
        self.category_ids = category_ids


def coco_datasets(cfg: "DataConfig", *, num_classes: int, shape: Sequence[int], roots: Sequence[Path]
                  ) -> tuple[CocoImages, CocoImages]:
    """(train, val) of data.coco (paths defaulting under data.root; `roots` when it is unset), both validated."""
    paths = {key: locate(getattr(cfg.coco, key), f"data.coco.{key}", default, roots,
                         folder=key.endswith("images"),
                         what="a folder of images" if key.endswith("images") else "a COCO detection JSON file")
             for key, default in DEFAULTS.items()}
    train = read_coco(paths["train_annotations"], paths["train_images"], num_classes, shape, split="train",
                      augment=cfg.augment)
    val = read_coco(paths["val_annotations"], paths["val_images"], num_classes, shape, split="val", augment=False)
    if val.category_ids != train.category_ids:
        raise DataError(f"the categories of {paths['val_annotations']} (ids {val.category_ids}) differ from those of "
                        f"{paths['train_annotations']} (ids {train.category_ids}); class indices follow the "
                        "categories list, so both must list the same categories in the same order.",
                        hint="Write the same categories list into both annotation files.")
    return train, val


def load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc}).",
                        hint="Give a readable UTF-8 COCO JSON file.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}).",
                        hint="Fix the file (a COCO detection JSON: images, annotations, categories).") from None


def _list(data: dict, key: str, path: Path) -> list[dict]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        state = "has no" if value is None else "has a malformed"
        raise DataError(f"{path} {state} {key!r} list; a COCO detection file holds lists of images, annotations "
                        "and categories (objects).", hint="Give a COCO detection (instances_*.json) file.")
    return value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_coco(annotations: Path, images: Path, num_classes: int, shape: Sequence[int], *, split: str,
              augment: bool) -> CocoImages:
    """Read and validate one split: every image file present with the JSON's size, every annotation's image and
    category known, every box inside its image (1-pixel tolerance) with positive width and height, at most
    num_classes categories."""
    field = f"data.coco.{split}"
    data = load_json(annotations)
    if not isinstance(data, dict):
        raise DataError(f"{annotations} holds a JSON {type(data).__name__}, not a COCO object (images, annotations, "
                        "categories).", hint="Give a COCO detection (instances_*.json) file.")
    categories, entries, anns = (_list(data, k, annotations) for k in ("categories", "images", "annotations"))

    class_of: dict[int, int] = {}
    for category in categories:
        cid = category.get("id")
        if not _int(cid) or cid in class_of:
            problem = "no integer" if not _int(cid) else "a repeated"
            raise DataError(f"{annotations}: category {category} has {problem} id.",
                            hint="Give every category a distinct integer id.")
        class_of[cid] = len(class_of)
    if len(class_of) > num_classes:
        raise DataError(f"{annotations} has {len(class_of)} categories but model.num_classes is {num_classes}.",
                        hint=f"Set model.num_classes to {len(class_of)} (or more), or remove the extra categories.")
    names = [str(c.get("name", c["id"])) for c in categories]

    by_id: dict[int, dict] = {}
    for entry in entries:
        iid, name = entry.get("id"), entry.get("file_name")
        if not _int(iid) or iid in by_id or not isinstance(name, str) or not name:
            raise DataError(f"{annotations}: image entry {_short(entry)} needs a distinct integer id and a file_name.",
                            hint="Fix the images list of the file.")
        file = images / name
        if not file.is_file():
            raise DataError(f"{annotations}: image {iid} ({name}) is missing: {file} does not exist.",
                            hint=f"Put {name} into {images}, point {field}_images at the folder holding the images, "
                                 "or remove the image and its annotations from the JSON.")
        width, height = image_size(file)
        if (entry.get("width", width), entry.get("height", height)) != (width, height):
            raise DataError(f"{annotations}: image {iid} ({name}) is {entry.get('width')}x{entry.get('height')} in "
                            f"the JSON but {file} is {width}x{height} pixels.",
                            hint="Fix the width and height in the JSON (the boxes are in the pixels it states), or "
                                 "use the images the annotations were made for.")
        by_id[iid] = {"file": file, "width": width, "height": height, "boxes": [], "labels": []}

    for number, ann in enumerate(anns):
        aid = ann.get("id", f"#{number}")
        image = by_id.get(ann.get("image_id")) if _int(ann.get("image_id")) else None
        if image is None:
            raise DataError(f"{annotations}: annotation {aid} refers to image_id {ann.get('image_id')!r}, which is not "
                            "in the images list.", hint="Add the image entry, or remove the annotation.")
        where = f"{annotations}: annotation {aid} (image {image['file'].name})"
        if ann.get("iscrowd", 0):
            continue
        cid = ann.get("category_id")
        if not _int(cid) or cid not in class_of:
            raise DataError(f"{where} has category_id {cid!r}, which is not in the categories list (ids "
                            f"{sorted(class_of)}).", hint="Add the category, or fix the annotation's category_id.")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            raise DataError(f"{where} has bbox {bbox!r}; COCO boxes are four numbers [x, y, width, height] in pixels.",
                            hint="Fix the annotation's bbox.")
        x, y, w, h = (float(v) for v in bbox)
        check_box((x, y, x + w, y + h), image["width"], image["height"], f"{where}, bbox [x, y, w, h] {bbox}",
                  "Fix or remove the annotation (COCO boxes are [x, y, width, height] in the image's pixels).")
        image["boxes"].append([max(0.0, x), max(0.0, y), min(image["width"], x + w), min(image["height"], y + h)])
        image["labels"].append(class_of[cid])

    records = [BoxRecord(v["file"], v["width"], v["height"], np.asarray(v["boxes"], dtype=np.float32).reshape(-1, 4),
                         np.asarray(v["labels"], dtype=np.int64)) for v in by_id.values()]
    return CocoImages(records, shape, names, list(class_of), augment=augment)


def _short(entry: dict) -> str:
    text = json.dumps(entry)
    return text if len(text) <= 120 else text[:117] + "..."
