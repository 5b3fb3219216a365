"""torchvision detectors as compressor models: one image tensor in, decoded boxes and class scores out, no NMS.

compressor trains, prunes and exports a detector like any other model, so the wrapper keeps the contract of
compressor/tasks/base.py: forward takes one tensor x (N, C, H, W) with values in [0, 1] and runs the network at that
size (torchvision's GeneralizedRCNNTransform, which resizes and normalises, is bypassed: the normalisation is done
here as tensor ops). In eval mode it returns (boxes (N, A, 4) x0, y0, x1, y1 in input pixels, decoded from the
regression with the anchors and clipped to the image; scores (N, A, C) class probabilities without background), the
raw outputs of the head decoded, for every anchor: NMS is the detection task's, the same code for PyTorch and ONNX.
In train mode it returns the raw head outputs, and `detection_loss(outputs, targets)` scores them with the torchvision
model's own loss code. The anchors depend only on the input size: they are computed once per size and held as a
non-persistent buffer, so neither forward nor an ONNX export runs the anchor generator at a fixed size.

Supported: the SSDs (compressor/models/detectors_ssd.py) and the one-stage FPN detectors RetinaNet and FCOS
(detectors_fpn.py). The two-stage R-CNNs (Faster, Mask, Keypoint) are not: their proposals go through NMS and RoI
pooling inside the network, which the no-NMS contract cannot hold; naming one raises ModelLoadError listing the
supported ones.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from compressor.errors import DataError, ModelLoadError

OUTPUT_LAYOUT = "boxes_scores"


def supported() -> dict[str, Callable[[str, int, int], nn.Module]]:
    """The torchvision detectors compressor wraps, by torchvision name, with their builders."""
    from compressor.models.detectors_fpn import build_fpn
    from compressor.models.detectors_ssd import build_ssd

    return {"ssdlite320_mobilenet_v3_large": build_ssd, "ssd300_vgg16": build_ssd,
            "retinanet_resnet50_fpn": build_fpn, "retinanet_resnet50_fpn_v2": build_fpn, "fcos_resnet50_fpn": build_fpn}


def build_torchvision_detector(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A randomly initialised torchvision detector (weights=None, weights_backbone=None) wrapped for compressor:
    `num_classes` object classes (SSD's extra background class is added and hidden), `in_channels` input
    channels (the first convolution is replaced when it is not 3). ModelLoadError for a detector not wrapped."""
    builders = supported()
    if name not in builders:
        raise ModelLoadError(
            f"torchvision:{name} is a torchvision detector compressor does not wrap; supported detectors: "
            f"{', '.join(f'torchvision:{n}' for n in builders)}.",
            hint="The two-stage R-CNNs (Faster/Mask/Keypoint R-CNN) run NMS on their proposals inside the network, "
                 "so their outputs cannot be the raw per-anchor boxes and scores compressor exports; use a supported "
                 "detector or an Ultralytics YOLO model (ultralytics:yolo11n.yaml).")
    if num_classes < 1:
        raise ModelLoadError(f"torchvision:{name} needs model.num_classes >= 1 object classes, got {num_classes}.")
    return builders[name](name, num_classes, in_channels)


class DenseDetector(nn.Module, metaclass=ABCMeta):
    """The part every wrapped one-stage detector shares: input normalisation, the anchors per input size, the
    eval outputs' contract, on torchvision's backbone (feature maps) and head (a dict of (N, A, k) tensors).
    Subclasses give `head_keys`, `_decode(outputs, anchors, size)`, `detection_loss` and `predictor_names`."""

    output_layout = OUTPUT_LAYOUT
    output_names = ("boxes", "scores")  # the eval outputs, named so in an ONNX export
    head_keys: tuple[str, ...] = ()  # the torchvision head's outputs, in the order train mode returns them

    def __init__(self, detector: nn.Module, num_classes: int, in_channels: int, name: str) -> None:
        super().__init__()
        self.detector = detector  # the torchvision model: backbone, head, anchor generator, loss code
        self.num_classes = num_classes
        self.name = name
        transform = detector.transform
        self.register_buffer("mean", _per_channel(transform.image_mean, in_channels), persistent=False)
        self.register_buffer("std", _per_channel(transform.image_std, in_channels), persistent=False)
        self.register_buffer("anchors", torch.zeros(0, 4), persistent=False)
        self.anchor_key: tuple = ()  # (input H, W, feature map sizes) the anchors were computed for
        self.loss_items: dict[str, torch.Tensor] = {}  # the last detection_loss's components, detached

    # ------------------------------------------------------------------------------------------ subclass parts
    @abstractmethod
    def _decode(self, outputs: dict[str, torch.Tensor], anchors: torch.Tensor,
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval outputs from the head's (at least float32): boxes (N, A, 4) xyxy pixels (not yet clipped), scores
        (N, A, C)."""
        ...  # each subclass implements it

    @abstractmethod
    def predictor_names(self) -> list[str]:
        ...  # each subclass implements it

    @abstractmethod
    def detection_loss(self, outputs: tuple[torch.Tensor, ...], targets: Any) -> torch.Tensor:
        ...  # each subclass implements it

    # ------------------------------------------------------------------------------------------ shared
    def forward(self, x: torch.Tensor):
        """Train: the head's raw tensors (N, A, k) in `head_keys` order. Eval: (boxes (N, A, 4), scores (N, A, C))."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        features = self.detector.backbone((x - self.mean) / self.std)
        features = [features] if isinstance(features, torch.Tensor) else list(features.values())
        head = self.detector.head(features)
        anchors = self._anchors(size, features)
        count = head[self.head_keys[0]].shape[1]
        if count != anchors.shape[0]:
            raise RuntimeError(f"the head predicts for {count} anchors, the anchor generator laid {anchors.shape[0]}")
        if self.training:
            return tuple(head[key] for key in self.head_keys)
        boxes, scores = self._decode({key: _at_least_float32(head[key]) for key in self.head_keys}, anchors, size)
        height, width = size  # torchvision clips its detections to the image too
        limit = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        return torch.minimum(boxes.clamp(min=0), limit), scores

    def head_outputs(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Train outputs as the dict torchvision's loss code takes (at least float32: the losses run outside
        autocast's half precision)."""
        if not isinstance(outputs, (tuple, list)) or len(outputs) != len(self.head_keys):
            raise TypeError(f"detection_loss takes the train-mode outputs of the model ({len(self.head_keys)} tensors: "
                            f"{', '.join(self.head_keys)}), got {type(outputs).__name__}")
        return {key: _at_least_float32(t) for key, t in zip(self.head_keys, outputs)}

    def protected_modules(self) -> list[str]:
        """Names (relative to this wrapper) of the prediction layers, never pruned: their outputs are the classes
        and box offsets (FCOS: and centre-ness) of each anchor."""
        return self.predictor_names()

    def set_input_size(self, height: int, width: int) -> None:
        """Compute the anchors for inputs of this size now (one eval pass of the network on zeros, statistics
        untouched): ModelLoadError when the backbone cannot take it. forward recomputes them itself on a new
        size; calling this first keeps the buffer fixed from then on (before DDP wraps the model, say)."""
        was_training = self.training
        try:
            with torch.no_grad():
                self.eval()(torch.zeros(1, self.mean.shape[1], height, width, device=self.mean.device))
        except Exception as exc:  # whatever the backbone's layers raise on a map they cannot take
            raise ModelLoadError(
                f"torchvision:{self.name} cannot run on {height}x{width} inputs ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}).",
                hint=f"Set model.input_shape to a size the detector's backbone takes{self.size_hint()}.") from None
        finally:
            self.train(was_training)

    def size_hint(self) -> str:
        return ""

    def _anchors(self, size: tuple[int, int], features: list[torch.Tensor]) -> torch.Tensor:
        """The anchors (A, 4) x0, y0, x1, y1 in input pixels for this input size, from the buffer; computed by the
        torchvision anchor generator (which reads only sizes, dtype and device) when the size is new."""
        key = (size, *(tuple(int(s) for s in f.shape[-2:]) for f in features))
        if key != self.anchor_key:
            from torchvision.models.detection.image_list import ImageList

            device = self.mean.device
            maps = [torch.empty(1, 1, *grid, device=device) for grid in key[1:]]
            with torch.no_grad():
                anchors = self.detector.anchor_generator(ImageList(torch.empty(1, 1, *size, device=device), [size]),
                                                         maps)[0]
            self.anchors = anchors.float()
            self.anchor_key = key
        return self.anchors


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast) up to float32 for pixel coordinates and losses; float64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def decode_offsets(coder: Any, regression: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Boxes (N, A, 4) from offsets (N, A, 4) by torchvision's BoxCoder against anchors (A, 4). decode_single
    decodes (A, 4 * k) offsets against (A, 4) boxes: the batch rides in k, so the anchors broadcast over any batch
    size (an ONNX export with a dynamic batch axis needs no tiling)."""
    count = anchors.shape[0]
    codes = regression.permute(1, 0, 2).reshape(count, -1)
    return coder.decode_single(codes, anchors).reshape(count, -1, 4).permute(1, 0, 2)


def _per_channel(values: Any, in_channels: int) -> torch.Tensor:
    """(1, C, 1, 1) of the model's per-channel normalisation; for C != 3 every channel gets the mean of the three."""
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() != in_channels:
        t = t.mean().expand(in_channels)
    return t.reshape(1, in_channels, 1, 1).clone()


def torchvision_targets(targets: Any, num_classes: int, shift: int) -> list[dict[str, torch.Tensor]]:
    """BoxTargets -> torchvision's per-image {"boxes", "labels"}, labels plus `shift` (1 where the model's class 0 is
    the background: SSD's softmax). Boxes without area are dropped: they match no anchor by IoU, and the box encoding
    of one forced onto its best anchor takes the log of zero. DataError for a label outside 0..num_classes-1."""
    labels = torch.cat([c.reshape(-1) for c in targets.labels]) if len(targets) else torch.zeros(0)
    low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"a box of this batch has class id {bad}, outside 0..{num_classes - 1} of model.num_classes "
                        f"{num_classes}.", hint="Set model.num_classes to the data set's number of classes.")
    out = []
    for boxes, classes in zip(targets.boxes, targets.labels):
        boxes = boxes.reshape(-1, 4).float()
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out.append({"boxes": boxes[keep], "labels": classes.reshape(-1)[keep].long() + shift})
    return out
