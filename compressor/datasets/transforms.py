"""Resizing and training augmentation of detection and segmentation samples, moving boxes and masks with the
image.

An image is a float tensor (C, H, W); boxes are float (K, 4) x0, y0, x1, y1 in its pixels; a mask is int64 (H, W).
The augmentation draws from torch's global RNG (four numbers per sample, whichever branches run), so a seeded
training loop (and its DataLoader workers, which torch seeds from it) repeats it exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

SCALE = (0.75, 1.25)  # the random scale-crop's zoom range
MIN_SIDE = 2.0  # boxes narrower or lower than this (pixels) after a crop are dropped
PAD_VALUE = 0.5  # image pixels a zoom-out pads with (mid grey); mask pixels pad with the ignore index


def _resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    out = F.interpolate(image[None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def _resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour (pixel centres aligned), so class indices stay class indices."""
    out = F.interpolate(mask[None, None].float(), size=tuple(int(s) for s in size), mode="nearest-exact")[0, 0]
    return out.round().long()


def _scale_boxes(boxes: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def fit(image: torch.Tensor, size: Sequence[int], *, boxes: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None):
    """(image, boxes, mask) resized to size (H, W) when the image's size differs: bilinear image, scaled boxes,
    nearest mask. Unchanged (the same objects) when it already has that size."""
    h, w = (int(s) for s in size)
    height, width = image.shape[-2:]
    if (height, width) == (h, w):
        return image, boxes, mask
    image = _resize_image(image, (h, w))
    if boxes is not None:
        boxes = _scale_boxes(boxes.float(), w / width, h / height)
    if mask is not None:
        mask = _resize_mask(mask, (h, w))
    return image, boxes, mask


def hflip(image: torch.Tensor, *, boxes: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
    """Mirror left-right: x0' = W - x1, x1' = W - x0."""
    width = image.shape[-1]
    if boxes is not None:
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return image.flip(-1), boxes, (mask.flip(-1) if mask is not None else None)


def scale_crop(image: torch.Tensor, scale: float, where: tuple[float, float], *,
               boxes: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None, ignore_index: int = 255):
    """Zoom by `scale`, then crop (zoomed in) or pad (zoomed out) back to the image's size. `where` (fy, fx) in
    [0, 1] places the window: 0 keeps the top/left edge, 1 the bottom/right. Padding is PAD_VALUE in the image and
    `ignore_index` in the mask; boxes move with the pixels, are clipped to the image and are dropped (with their
    labels) when under MIN_SIDE pixels wide or high. Returns (image, boxes, labels, mask)."""
    channels, height, width = image.shape
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    dy, dx = round(where[0] * (height - h)), round(where[1] * (width - w))  # where the zoomed image's (0, 0) lands
    ys, xs = slice(max(0, -dy), min(h, height - dy)), slice(max(0, -dx), min(w, width - dx))  # its kept part
    yd, xd = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
    out = image.new_full((channels, height, width), PAD_VALUE)
    out[:, yd, xd] = _resize_image(image, (h, w))[:, ys, xs]
    if mask is not None:
        placed = mask.new_full((height, width), ignore_index)
        placed[yd, xd] = _resize_mask(mask, (h, w))[ys, xs]
        mask = placed
    if boxes is not None:
        boxes = _scale_boxes(boxes.float(), w / width, h / height) + boxes.new_tensor([dx, dy, dx, dy]).float()
        boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                             boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], 1)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_SIDE)
        boxes = boxes[keep]
        labels = labels[keep] if labels is not None else None
    return out, boxes, labels, mask


def augment(image: torch.Tensor, *, boxes: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None, ignore_index: int = 255):
    """The training augmentation: a horizontal flip (p 0.5), then a random scale-crop (scale uniform in SCALE,
    window placed uniformly). Returns (image, boxes, labels, mask)."""
    coin, zoom, fy, fx = torch.rand(4).tolist()
    if coin < 0.5:
        image, boxes, mask = hflip(image, boxes=boxes, mask=mask)
    scale = SCALE[0] + zoom * (SCALE[1] - SCALE[0])
    return scale_crop(image, scale, (fy, fx), boxes=boxes, labels=labels, mask=mask, ignore_index=ignore_index)
