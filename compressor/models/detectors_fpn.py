"""torchvision's one-stage FPN detectors (RetinaNet v1/v2, FCOS) wrapped as compressor detectors (see
compressor/models/detectors.py for the contract). Their classifiers are sigmoids over the object classes with no
background column, so they are built with num_classes = C and take the 0-based labels as they are."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.models.detectors import DenseDetector, decode_offsets, torchvision_targets


def build_fpn(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    from compressor.models.loading import _replace_first_conv

    detector = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(detector.backbone, in_channels, f"torchvision:{name}")
    kind = FCOSDetector if name.startswith("fcos") else RetinaNetDetector
    return kind(detector, num_classes, in_channels, name)


class RetinaNetDetector(DenseDetector):
    """RetinaNet: per anchor (9 per cell on P3-P7), 4 box offsets (BoxCoder, weights 1) and C class logits.
    Train outputs: (bbox_regression (N, A, 4), cls_logits (N, A, C)); eval: (boxes, sigmoid of the logits)."""

    head_keys = ("bbox_regression", "cls_logits")

    def _decode(self, outputs: dict[str, torch.Tensor], anchors: torch.Tensor,
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = decode_offsets(self.detector.box_coder, outputs["bbox_regression"], anchors)
        return boxes, torch.sigmoid(outputs["cls_logits"])

    def predictor_names(self) -> list[str]:
        """The class and box predictors (one convolution each, shared by every FPN level)."""
        return ["detector.head.classification_head.cls_logits", "detector.head.regression_head.bbox_reg"]

    def detection_loss(self, outputs: tuple[torch.Tensor, ...], targets: Any) -> torch.Tensor:
        """torchvision's RetinaNet loss (RetinaNet.compute_loss: its IoU matcher at 0.5 / 0.4 with low-quality
        matches, sigmoid focal loss, L1 on the matched anchors' offsets): box regression + classification."""
        per_image = torchvision_targets(targets, self.num_classes, shift=0)
        losses = self.detector.compute_loss(per_image, self.head_outputs(outputs), [self.anchors] * len(per_image))
        self.loss_items = {"box": losses["bbox_regression"].detach(), "cls": losses["classification"].detach()}
        return losses["bbox_regression"] + losses["classification"]


class FCOSDetector(DenseDetector):
    """FCOS: per location of P3-P7 (its "anchor" is a square of the level's stride, for the centre and the scale),
    4 distances (BoxLinearCoder), C class logits and a centre-ness logit. Train outputs: (bbox_regression (N, A, 4),
    cls_logits (N, A, C), bbox_ctrness (N, A, 1)); eval: (boxes, sqrt(sigmoid(class) * sigmoid(centre-ness))), the
    score torchvision ranks FCOS detections by."""

    head_keys = ("bbox_regression", "cls_logits", "bbox_ctrness")

    def _decode(self, outputs: dict[str, torch.Tensor], anchors: torch.Tensor,
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = self.detector.box_coder.decode(outputs["bbox_regression"], anchors)  # broadcasts over the batch
        scores = torch.sqrt(torch.sigmoid(outputs["cls_logits"]) * torch.sigmoid(outputs["bbox_ctrness"]))
        return boxes, scores

    def predictor_names(self) -> list[str]:
        """The class, box and centre-ness predictors (one convolution each, shared by every FPN level)."""
        return ["detector.head.classification_head.cls_logits", "detector.head.regression_head.bbox_reg",
                "detector.head.regression_head.bbox_ctrness"]

    def detection_loss(self, outputs: tuple[torch.Tensor, ...], targets: Any) -> torch.Tensor:
        """torchvision's FCOS loss (FCOS.compute_loss: centre sampling and scale ranges per level, sigmoid focal loss,
        GIoU loss, centre-ness BCE): box regression + classification + centre-ness."""
        per_image = torchvision_targets(targets, self.num_classes, shift=0)
        per_level = [h * w for h, w in self.anchor_key[1:]]  # one location per cell
        losses = self.detector.compute_loss(per_image, self.head_outputs(outputs), [self.anchors] * len(per_image),
                                            per_level)
        self.loss_items = {"box": losses["bbox_regression"].detach(), "cls": losses["classification"].detach(),
                           "ctr": losses["bbox_ctrness"].detach()}
        return losses["bbox_regression"] + losses["classification"] + losses["bbox_ctrness"]
