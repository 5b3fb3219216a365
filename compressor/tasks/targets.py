"""A detection batch's targets: per image, boxes (K, 4) as x0, y0, x1, y1 in input pixels and 0-based class ids
(K,). Moves to a device like a tensor and has len() = images, so the training loop treats it as it treats labels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class BoxTargets:
    boxes: list[torch.Tensor]  # per image: float (K, 4) x0, y0, x1, y1 in pixels of the input tensor
    labels: list[torch.Tensor]  # per image: int64 (K,), 0-based class ids
    size: tuple[int, int]  # (H, W) of the input tensor

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self, device: Any, non_blocking: bool = False) -> "BoxTargets":
        return BoxTargets([b.to(device, non_blocking=non_blocking) for b in self.boxes],
                          [c.to(device, non_blocking=non_blocking) for c in self.labels], self.size)

    def __getitem__(self, index: slice) -> "BoxTargets":
        return BoxTargets(self.boxes[index], self.labels[index], self.size)

    @staticmethod
    def collate(samples: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, "BoxTargets"]:
        """(image (C, H, W), {"boxes", "labels"}) samples of one size -> (images (N, C, H, W), BoxTargets)."""
        images = torch.stack([image for image, _ in samples])
        return images, BoxTargets([t["boxes"].float().reshape(-1, 4) for _, t in samples],
                                  [t["labels"].long().reshape(-1) for _, t in samples], tuple(images.shape[-2:]))

    def yolo_batch(self) -> dict[str, torch.Tensor]:
        """The batch dict Ultralytics' detection loss takes: batch_idx (M,), cls (M, 1), bboxes (M, 4) as
        normalised cx, cy, w, h."""
        h, w = self.size
        boxes = torch.cat(self.boxes) if self.boxes else torch.zeros(0, 4)
        scale = boxes.new_tensor([w, h, w, h])
        xyxy = boxes / scale
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                              xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)
        index = torch.cat([torch.full((len(b),), i, dtype=torch.float32, device=boxes.device)
                           for i, b in enumerate(self.boxes)]) if self.boxes else torch.zeros(0)
        return {"batch_idx": index, "cls": torch.cat(self.labels).float().reshape(-1, 1) if self.labels else
                torch.zeros(0, 1), "bboxes": cxcywh}
