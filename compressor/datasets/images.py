"""What the detection and segmentation readers share: finding the recipe's folders and files, listing and reading
images with PIL, and the box dataset that the COCO and YOLO readers both fill.

Annotations are read and validated when a dataset is built (a bad set fails before any training); the pixels are
read lazily, one image per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from compressor.errors import DataError
from compressor.datasets import transforms

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PAIRED_SUFFIXES = IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES)


def _pil():
    from PIL import Image, UnidentifiedImageError

    return Image, UnidentifiedImageError


def locate(given: Optional[Path], field: str, default: str, roots: Sequence[Path], *, folder: bool,
           what: str) -> Path:
    """The path a data.* field names, else `default` (relative to data.root; when that is unset, the first of the
    search roots where it exists). DataError naming what was looked for and the field that sets it."""
    exists = Path.is_dir if folder else Path.is_file
    if given is not None:
        path = Path(given).expanduser()
        if not exists(path):
            state = "is not a folder" if path.exists() else "does not exist"
            raise DataError(f"{field}: {path} {state} (expected {what}).",
                            hint=f"Point {field} at {what}.")
        return path
    looked = [Path(root).expanduser() / default for root in roots]
    for path in looked:
        if exists(path):
            return path
    raise DataError(f"{field} is unset and its default, data.root/{default} ({what}), does not exist: looked for "
                    f"{', '.join(str(p) for p in looked)}.",
                    hint=f"Set data.root to the dataset's folder, or {field} to {what}.")


def list_images(folder: Path) -> list[Path]:
    """Image files under a folder (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header (the pixels are not decoded)."""
    Image, Unidentified = _pil()
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, Unidentified) as exc:
        raise DataError(f"{path} is not a readable image ({type(exc).__name__}: {exc}).",
                        hint="Replace or remove the file.") from None


def read_image(path: Path, channels: int) -> torch.Tensor:
    """An image file as float32 (channels, H, W) in [0, 1]: colour images to RGB (3) or luminance (1); a greyscale
    image is repeated to 3 channels when the model takes 3."""
    Image, Unidentified = _pil()
    if channels not in (1, 3):
        raise DataError(f"image data sets read 1- or 3-channel images; model.input_shape asks for {channels} "
                        "channels.", hint="Set model.input_shape[0] (and model.in_channels) to 1 or 3.")
    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: keep the range, scale to 8 bits
                array = np.asarray(image, dtype=np.float32)
                array = array / (65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0)
                tensor = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0)
                return tensor.expand(channels, -1, -1).contiguous()
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (OSError, Unidentified) as exc:
        raise DataError(f"{path} is not a readable image ({type(exc).__name__}: {exc}).",
                        hint="Replace or remove the file.") from None
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255.0)


def read_mask(path: Path) -> np.ndarray:
    """A single-channel mask image (class index per pixel: 8/16-bit greyscale or a palette PNG's indices) as an
    int64 array (H, W)."""
    Image, Unidentified = _pil()
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"mask {path} has {len(image.getbands())} channels (PIL mode {image.mode}); a mask "
                                "holds one class index per pixel.",
                                hint="Save masks as single-channel PNGs (8-bit greyscale or palette) of class indices.")
            return np.asarray(image, dtype=np.int64)
    except (OSError, Unidentified) as exc:
        raise DataError(f"mask {path} is not a readable image ({type(exc).__name__}: {exc}).",
                        hint="Replace or remove the file.") from None


def check_box(box: Sequence[float], width: int, height: int, where: str, fix: str) -> None:
    """A box x0, y0, x1, y1 (pixels) must have positive width and height and lie inside the image within 1 pixel."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise DataError(f"{where}: box {_fmt(box)} is not finite.", hint=fix)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        raise DataError(f"{where}: box {_fmt(box)} (x0, y0, x1, y1) has non-positive width or height "
                        f"({x1 - x0:g} x {y1 - y0:g}).", hint=fix)
    if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
        raise DataError(f"{where}: box {_fmt(box)} (x0, y0, x1, y1) lies outside the {width}x{height} image (more "
                        "than 1 pixel).", hint=fix)


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


@dataclass(frozen=True)
class BoxRecord:
    """One image of a detection set: its file, its size and its boxes (x0, y0, x1, y1 pixels, clipped to it)."""
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 (K, 4)
    labels: np.ndarray  # int64 (K,), 0-based


class BoxImages(Dataset):
    """Detection samples: (image float32 (C, H, W) in [0, 1], {"boxes": (K, 4) x0, y0, x1, y1 pixels of the
    returned image, "labels": int64 (K,)}); images resized to `shape` (C, H, W) when their size differs, and, with
    `augment`, flipped and scale-cropped (compressor/datasets/transforms.py). Batches collate to BoxTargets."""

    def __init__(self, records: list[BoxRecord], shape: Sequence[int], classes: list[str], *,
                 augment: bool = False) -> None:
        self.records, self.shape, self.classes, self.augment = records, tuple(int(s) for s in shape), classes, augment

    def __len__(self) -> int:
        return len(self.records)

    @property
    def collate(self):
        """BoxTargets.collate (imported here: the tasks layer sits above the dataset readers)."""
        from compressor.tasks.targets import BoxTargets

        return BoxTargets.collate

    def __getitem__(self, index: int):
        record = self.records[index]
        image = read_image(record.path, self.shape[0])
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise DataError(f"{record.path} is {image.shape[-1]}x{image.shape[-2]} pixels but its annotations say "
                            f"{record.width}x{record.height}; it changed after the data set was read.",
                            hint="Rebuild the data set (or restart) after changing its files.")
        boxes, labels = torch.from_numpy(record.boxes.copy()), torch.from_numpy(record.labels.copy())
        image, boxes, _ = transforms.fit(image, self.shape[1:], boxes=boxes)
        if self.augment:
            image, boxes, labels, _ = transforms.augment(image, boxes=boxes, labels=labels)
        return image, {"boxes": boxes.float(), "labels": labels.long()}
