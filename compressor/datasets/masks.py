"""kind: masks, semantic segmentation from a folder of images and a folder of mask PNGs.

A mask has its image's stem (and relative folder) with the .png extension, the image's size, and one class index per
pixel: 0..model.num_classes-1 (0 is the background, so num_classes counts it) or data.masks.ignore_index (pixels no
loss or metric counts; the augmentation's padding uses it too). Every mask is read and checked when the dataset is
built; training reads them again, lazily.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from compressor.datasets import transforms
from compressor.datasets.images import image_size, list_images, locate, read_image, read_mask
from compressor.errors import DataError

if TYPE_CHECKING:
    from compressor.train.config import DataConfig

DEFAULTS = {"train_images": "images/train", "train_masks": "masks/train", "val_images": "images/val",
            "val_masks": "masks/val"}


class MaskImages(Dataset):
    """Segmentation samples: (image float32 (C, H, W) in [0, 1], mask int64 (H, W)); resized to `shape` when their
    size differs (the mask nearest-neighbour), and with `augment` flipped and scale-cropped together."""

    def __init__(self, pairs: list[tuple[Path, Path]], shape: Sequence[int], num_classes: int, ignore_index: int, *,
                 augment: bool = False) -> None:
        self.pairs, self.shape, self.num_classes = pairs, tuple(int(s) for s in shape), num_classes
        self.ignore_index, self.augment = ignore_index, augment

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_file, mask_file = self.pairs[index]
        image = read_image(image_file, self.shape[0])
        mask = torch.from_numpy(read_mask(mask_file))
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise DataError(f"mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} but its image {image_file} is "
                            f"{image.shape[-1]}x{image.shape[-2]}; it changed after the data set was read.",
                            hint="Rebuild the data set (or restart) after changing its files.")
        image, _, mask = transforms.fit(image, self.shape[1:], mask=mask)
        if self.augment:
            image, _, _, mask = transforms.augment(image, mask=mask, ignore_index=self.ignore_index)
        return image, mask


def mask_datasets(cfg: "DataConfig", *, num_classes: int, shape: Sequence[int], roots: Sequence[Path]
                  ) -> tuple[MaskImages, MaskImages]:
    """(train, val) of data.masks (folders defaulting under data.root; `roots` when it is unset), both validated."""
    ignore = cfg.masks.ignore_index
    if ignore < num_classes:
        raise DataError(f"data.masks.ignore_index {ignore} is a class index (model.num_classes is {num_classes}).",
                        hint="Set data.masks.ignore_index to a value no class uses (255 by default).")
    paths = {key: locate(getattr(cfg.masks, key), f"data.masks.{key}", default, roots, folder=True,
                         what="a folder of images" if key.endswith("images") else "a folder of mask PNGs")
             for key, default in DEFAULTS.items()}
    return tuple(read_masks(paths[f"{split}_images"], paths[f"{split}_masks"], num_classes, ignore, shape,
                            split=split, augment=cfg.augment and split == "train") for split in ("train", "val"))


def read_masks(images: Path, masks: Path, num_classes: int, ignore_index: int, shape: Sequence[int], *, split: str,
               augment: bool) -> MaskImages:
    """Pair every image with its mask and check each mask: present, single-channel, the image's size, values in
    [0, num_classes) or ignore_index."""
    files = list_images(images)
    if not files:
        raise DataError(f"data.masks.{split}_images: {images} holds no images.",
                        hint=f"Point data.masks.{split}_images at a folder of images.")
    pairs = []
    for image in files:
        mask = (masks / image.relative_to(images)).with_suffix(".png")
        if not mask.is_file():
            raise DataError(f"image {image} has no mask: {mask} does not exist.",
                            hint=f"Add the mask (a PNG with the image's stem) to {masks}, point "
                                 f"data.masks.{split}_masks at the folder holding the masks, or remove the image.")
        values = read_mask(mask)
        width, height = image_size(image)
        if values.shape != (height, width):
            raise DataError(f"mask {mask} is {values.shape[1]}x{values.shape[0]} but its image {image} is "
                            f"{width}x{height}.", hint="Give every mask its image's size.")
        present = np.unique(values)
        bad = [int(v) for v in present if not (0 <= v < num_classes or v == ignore_index)]
        if bad:
            shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise DataError(f"mask {mask} has values {shown} outside 0..{num_classes - 1} (model.num_classes "
                            f"{num_classes}, 0 the background) and other than data.masks.ignore_index {ignore_index}.",
                            hint="Set model.num_classes to the number of classes counting the background, set "
                                 "data.masks.ignore_index to the value of unlabelled pixels, or fix the mask.")
        pairs.append((image, mask))
    return MaskImages(pairs, shape, num_classes, ignore_index, augment=augment)
