"""torchvision segmenters as compressor models: one input tensor in, one (N, classes, H, W) logits tensor out.

torchvision's segmentation models (LRASPP, DeepLabV3, FCN) return a dict ({"out": logits at input resolution,
"aux": ...}); compressor's tasks, pruning graph and ONNX export want one tensor (compressor/tasks/base.py).
`SegmentationLogits` returns output["out"]. It adopts the segmenter's submodules as its own and runs the
segmenter class's forward on itself, so module names, model.ignore names and state-dict keys are torchvision's
(`backbone.…`, `classifier.…`): a torchvision state dict loads into the wrapper unchanged. The auxiliary head is
dropped: only "out" is returned, so the head would cost MACs and pruning work for an output nobody reads.
"""
from __future__ import annotations

import torch
from torch import nn

from compressor.errors import ModelLoadError
from compressor.registry import did_you_mean

PROBE_SIZE = 64  # side of the probe input protected_modules() runs (every torchvision segmenter's stride fits it)


def segmenter_classes() -> tuple[type, ...]:
    """The torchvision classes whose forward returns {"out": logits, ...}: DeepLabV3 and FCN (their common base)
    and LRASPP."""
    from torchvision.models.segmentation import LRASPP
    from torchvision.models.segmentation._utils import _SimpleSegmentationModel

    return (_SimpleSegmentationModel, LRASPP)


def is_torchvision_segmenter(module: nn.Module) -> bool:
    return isinstance(module, segmenter_classes())


class SegmentationLogits(nn.Module):
    """A torchvision segmenter whose forward returns output["out"], (N, classes, H, W) at input resolution."""

    dynamic_size = True  # exported with any height and width (compressor/deploy/export.py)

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        if not is_torchvision_segmenter(segmenter):
            raise ModelLoadError(f"{type(segmenter).__name__} is not a torchvision segmentation model (LRASPP, "
                                 "DeepLabV3 or FCN); SegmentationLogits runs only their forward.",
                                 hint="Wrap the model so that forward returns its logits tensor and load it with "
                                      "python:pkg.module:factory.")
        self.segmenter_class = type(segmenter)  # its forward runs on this module (it reads these submodules)
        for name, child in segmenter.named_children():
            self.add_module(name, child)
        if hasattr(segmenter, "aux_classifier"):
            self.aux_classifier = None  # DeepLabV3/FCN read it; None: the auxiliary branch does not run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter_class.forward(self, x)["out"]

    def protected_modules(self) -> list[str]:
        """Names of the convolutions that produce the class channels: the Conv2d layers whose outputs reach the
        logits with no other convolution in between and whose out_channels are the classes (LRASPP:
        classifier.low_classifier and classifier.high_classifier; DeepLabV3 / FCN: classifier.4). Found on one
        forward of a small probe input (eval mode, this module's device and dtype), so the head's layout is not
        hard-coded."""
        return final_convs(self)


def final_convs(model: nn.Module, size: int = PROBE_SIZE) -> list[str]:
    """The Conv2d layers of `model` (a module returning one (N, classes, H, W) tensor) whose outputs reach its
    output with no other Conv2d in between and whose out_channels equal the output's channels: walked back through
    autograd from the output of one probe forward."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return []
    weight = first.weight
    produced: dict[object, nn.Module] = {}  # autograd node of each conv output -> the conv

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced[output.grad_fn] = module

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks = [m.register_forward_hook(record) for m in convs]
    was_training = model.training
    probe = torch.zeros(1, first.in_channels, size, size, dtype=weight.dtype, device=weight.device)
    try:
        with torch.enable_grad():
            out = model.eval()(probe.requires_grad_(True))  # every conv output then has an autograd node
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    found: set[nn.Module] = set()
    seen: set[object] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced:
            found.add(produced[node])
            continue
        stack += [child for child, _ in node.next_functions]
    classes = out.shape[1]
    return [name for name, m in model.named_modules() if m in found and m.out_channels == classes]


def wrap_segmenter(module: nn.Module) -> nn.Module:
    """A loaded torchvision segmentation model (e.g. a pickled LRASPP) as SegmentationLogits; a module already
    wrapped is returned as it is."""
    if isinstance(module, SegmentationLogits):
        return module
    return SegmentationLogits(module)


def build_torchvision_segmenter(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision:NAME of torchvision.models.segmentation, randomly initialised (weights=None,
    weights_backbone=None: nothing is downloaded), without the auxiliary head, its first convolution taking
    `in_channels`, wrapped in SegmentationLogits."""
    import torchvision
    from torchvision.models import segmentation

    from compressor.models.loading import _accepted_kwargs, _replace_first_conv

    known = torchvision.models.list_models(module=segmentation)
    if name not in known:
        raise ModelLoadError(f"unknown torchvision segmentation model {name!r}{did_you_mean(name, known)}; known: "
                             f"{', '.join(known)}.")
    builder = torchvision.models.get_model_builder(name)
    kwargs = _accepted_kwargs(builder, {"weights": None, "weights_backbone": None, "num_classes": num_classes,
                                        "aux_loss": False})
    model = builder(**kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, f"torchvision:{name}")
    return SegmentationLogits(model)

