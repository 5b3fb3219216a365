"""torchvision's SSD family (SSDlite320-MobileNetV3-Large, SSD300-VGG16) wrapped as compressor detectors
(see compressor/models/detectors.py for the contract)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.models.detectors import DenseDetector, decode_offsets, torchvision_targets


def build_ssd(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    from compressor.models.loading import _replace_first_conv

    detector = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes + 1)
    if in_channels != 3:
        _replace_first_conv(detector.backbone, in_channels, f"torchvision:{name}")
    return SSDDetector(detector, num_classes, in_channels, name)


class SSDDetector(DenseDetector):
    """An SSD: per anchor, 4 box offsets (torchvision's BoxCoder, weights 10, 10, 5, 5) and C + 1 class logits with
    the background first. Train outputs: (bbox_regression (N, A, 4), cls_logits (N, A, C + 1)); eval outputs:
    (boxes (N, A, 4), scores (N, A, C)), the softmax over the C + 1 logits without the background's column."""

    head_keys = ("bbox_regression", "cls_logits")

    def _decode(self, outputs: dict[str, torch.Tensor], anchors: torch.Tensor,
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = decode_offsets(self.detector.box_coder, outputs["bbox_regression"], anchors)
        return boxes, F.softmax(outputs["cls_logits"], dim=-1)[..., 1:]

    def predictor_names(self) -> list[str]:
        """The last convolution of every level of the classification and the regression head."""
        names = []
        for part in ("classification_head", "regression_head"):
            for index, block in enumerate(self.detector.head.get_submodule(part).module_list):
                convs = [n for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
                suffix = f".{convs[-1]}" if convs[-1] else ""
                names.append(f"detector.head.{part}.module_list.{index}{suffix}")
        return names

    def detection_loss(self, outputs: tuple[torch.Tensor, ...], targets: Any) -> torch.Tensor:
        """torchvision's SSD loss (SSD.compute_loss: smooth-L1 on the matched anchors' offsets, cross-entropy with
        hard negative mining at 3:1) of the train outputs, anchors matched to the targets (BoxTargets, 0-based
        labels) by torchvision's SSDMatcher: box regression + classification, a scalar."""
        from torchvision.ops import box_iou

        head = self.head_outputs(outputs)
        anchors = self.anchors
        per_image = torchvision_targets(targets, self.num_classes, shift=1)
        matched = []
        for target in per_image:
            if target["boxes"].numel() == 0:
                matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
            else:
                matched.append(self.detector.proposal_matcher(box_iou(target["boxes"], anchors)))
        losses = self.detector.compute_loss(per_image, head, [anchors] * len(per_image), matched)
        self.loss_items = {"box": losses["bbox_regression"].detach(), "cls": losses["classification"].detach()}
        return losses["bbox_regression"] + losses["classification"]

    def size_hint(self) -> str:
        return " (SSD300-VGG16 needs at least 268x268: its last two levels are unpadded 3x3 convolutions)" \
            if self.name == "ssd300_vgg16" else ""
