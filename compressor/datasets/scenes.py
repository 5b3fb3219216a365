"""A deterministic offline detection + segmentation set: Fashion-MNIST items placed on textured canvases.

Each image is a `size` x `size` RGB canvas with a smooth random texture (low-frequency colour noise plus a faint
stripe pattern) and 0-4 Fashion-MNIST items, each scaled (1x to 2.5x), tinted and blended in where the item's
pixels are bright enough. An item's mask is those pixels (after later items covered it); its box is the mask's
extent. Items that later items cover by more than half are dropped, so every annotation is visible.

Written three ways, each readable by compressor's data kinds and by the tools people use:
  images/{train,val}/NNNNNN.png       the canvases
  annotations/instances_{split}.json  COCO detection (bbox [x, y, w, h], area, iscrowd 0; category ids 1..10)
  labels/{train,val}/NNNNNN.txt       YOLO labels: class cx cy w h, normalised (class ids 0..9)
  masks/{train,val}/NNNNNN.png        semantic masks: 0 background, 1..10 the item's class + 1
  data.yaml                           an Ultralytics dataset YAML (path, train, val, names)

Everything depends only on (seed, split, index): the same files on every machine (PNG pixels; the JSON and text
are written with fixed formatting).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
ITEM_THRESHOLD = 40  # item pixels brighter than this (of 255) belong to the item's mask
MIN_VISIBLE = 0.5  # an item covered by later ones below this fraction of its own pixels is dropped
MIN_SIDE = 4  # boxes narrower or lower than this (pixels) are dropped


@dataclass(frozen=True)
class Item:
    cls: int  # 0-based class index
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    pixels: int  # visible mask pixels


def fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of a Fashion-MNIST split from its idx files in `root`."""
    from compressor.train.data import _find_idx, _read_idx
    from compressor.errors import DataError

    paths = [_find_idx(Path(root), stem) for stem in SPLITS[split]]
    if not all(paths):
        raise DataError(f"Fashion-MNIST {split} files not found in {root}.",
                        hint="Install them with `apt-get install -y dataset-fashion-mnist` (Debian), or pass the "
                             "folder holding the four *-idx*-ubyte.gz files.")
    return _read_idx(paths[0]), _read_idx(paths[1]).astype(np.int64)


def _texture(rng: np.random.RandomState, size: int) -> np.ndarray:
    """A smooth random RGB background (float32 in [0, 255]): bilinear-upsampled coarse noise plus stripes."""
    coarse = rng.uniform(40, 200, size=(3, 5, 5)).astype(np.float32)
    grid = np.linspace(0, 4, size, dtype=np.float32)
    i0 = np.clip(grid.astype(int), 0, 3)
    f = grid - i0
    rows = coarse[:, i0, :] * (1 - f)[None, :, None] + coarse[:, i0 + 1, :] * f[None, :, None]
    canvas = rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stripes = 18.0 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    noise = rng.normal(0, 6, size=(3, size, size)).astype(np.float32)
    return np.clip(canvas + stripes[None] + noise, 0, 255).transpose(1, 2, 0)


def _resize(item: np.ndarray, side: int) -> np.ndarray:
    """Nearest-neighbour-free bilinear resize of a 28x28 uint8 item to side x side (float32)."""
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.float32)


def render(images: np.ndarray, labels: np.ndarray, rng: np.random.RandomState, size: int,
           max_items: int = 4) -> tuple[np.ndarray, np.ndarray, list[Item]]:
    """One scene: (RGB uint8 (size, size, 3), class mask uint8 (size, size), visible items)."""
    canvas = _texture(rng, size)
    owner = np.full((size, size), -1, dtype=np.int64)  # which placed item each pixel shows
    placed: list[tuple[int, np.ndarray]] = []  # (class, full mask of the item as placed)
    for _ in range(rng.randint(0, max_items + 1)):
        index = rng.randint(len(images))
        side = int(rng.randint(28, min(70, size) + 1))
        item = _resize(images[index], side)
        x0, y0 = rng.randint(0, size - side + 1), rng.randint(0, size - side + 1)
        mask = np.zeros((size, size), dtype=bool)
        mask[y0:y0 + side, x0:x0 + side] = item > ITEM_THRESHOLD
        if not mask.any():
            continue
        tint = rng.uniform(0.35, 1.0, size=3).astype(np.float32)
        alpha = np.clip(item / 255.0 * 1.4, 0, 1)[..., None]
        colour = item[..., None] * tint[None, None, :] * 1.1 + 20
        region = canvas[y0:y0 + side, x0:x0 + side]
        region[:] = np.where((item > ITEM_THRESHOLD)[..., None], alpha * colour + (1 - alpha) * region, region)
        owner[mask] = len(placed)
        placed.append((int(labels[index]), mask))
    class_mask = np.zeros((size, size), dtype=np.uint8)
    items: list[Item] = []
    for k, (cls, mask) in enumerate(placed):
        visible = owner == k
        if visible.sum() < MIN_VISIBLE * mask.sum():
            owner[visible] = -1  # dropped: its pixels are background in the masks (still drawn in the image)
            continue
        ys, xs = np.nonzero(visible)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if box[2] - box[0] < MIN_SIDE or box[3] - box[1] < MIN_SIDE:
            owner[visible] = -1
            continue
        class_mask[visible] = cls + 1
        items.append(Item(cls=cls, box=box, pixels=int(visible.sum())))
    return np.clip(canvas, 0, 255).round().astype(np.uint8), class_mask, items


def write_scenes(out: Path, *, fmnist_root: Path = Path("/usr/share/datasets/fashion-mnist"), train: int = 2000,
                 val: int = 400, size: int = 160, seed: int = 0, max_items: int = 4,
                 progress: Optional[callable] = None) -> dict[str, int]:
    """Write the set to `out` (see the module docstring); returns {split: images}. Deterministic in (seed, split,
    index); train items come from Fashion-MNIST's training split and val items from its test split."""
    from PIL import Image

    out = Path(out)
    counts = {"train": train, "val": val}
    for split, count in counts.items():
        images, labels = fashion_mnist(fmnist_root, split)
        for sub in ("images", "labels", "masks"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)
        coco = {"info": {"description": f"compressor Fashion-MNIST scenes, {split}, seed {seed}, {size}px"},
                "images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]}
        for index in range(count):
            rng = np.random.RandomState([seed, 0 if split == "train" else 1, index])
            image, mask, items = render(images, labels, rng, size, max_items)
            name = f"{index:06d}.png"
            Image.fromarray(image).save(out / "images" / split / name)
            Image.fromarray(mask).save(out / "masks" / split / name)
            lines = [f"{it.cls} {(it.box[0] + it.box[2]) / 2 / size:.6f} {(it.box[1] + it.box[3]) / 2 / size:.6f} "
                     f"{(it.box[2] - it.box[0]) / size:.6f} {(it.box[3] - it.box[1]) / size:.6f}" for it in items]
            (out / "labels" / split / f"{index:06d}.txt").write_text("".join(line + "\n" for line in lines))
            coco["images"].append({"id": index + 1, "file_name": name, "width": size, "height": size})
            for it in items:
                x0, y0, x1, y1 = it.box
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": index + 1,
                                            "category_id": it.cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                            "area": it.pixels, "iscrowd": 0})
            if progress is not None:
                progress(split, index + 1, count)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, indent=1) + "\n")
    (out / "data.yaml").write_text(_dataset_yaml(out))
    return counts


def _dataset_yaml(out: Path) -> str:
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    return (f"# Ultralytics dataset YAML of the compressor Fashion-MNIST scenes\npath: {out.resolve()}\n"
            f"train: images/train\nval: images/val\nnames:\n{names}")


def class_names(with_background: bool = False) -> Iterable[str]:
    return (("background",) if with_background else ()) + CLASSES
