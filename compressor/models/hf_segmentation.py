"""Hugging Face semantic segmenters (`hf:DIR` whose config.json names a *ForSemanticSegmentation class: SegFormer,
and the others of transformers' semantic-segmentation mapping that return `logits` (N, C, h, w)) as compressor
segmentation models: one pixel tensor in, (N, C, H, W) logits at the input's resolution out.

SegFormer's decode head predicts at a quarter of the input size (others at 1/8 to 1/32); the segmentation task, the
examples and the ONNX parity compare per-pixel logits at the mask's size, so the wrapper upsamples bilinearly (as
transformers' own loss and post-processing do, align_corners=False) inside forward: the exported graph gives the
same full-size logits and takes any height and width (dynamic_size). The classifier convolution(s) producing the
class channels are protected from pruning (found by walking back from the output, as for torchvision segmenters).
SegFormer is tested end to end (tests/test_hf_tasks.py); MobileViT's and BEiT's segmenters load and run the same
way. transformers collects the stage outputs the decode head reads through forward hooks it installs on first use;
they are closures, so they are taken off before the wrapper is pickled or deep-copied (and come back on the next
forward).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import ModelLoadError
from compressor.models.hf import HFLogits, from_pretrained_checked
from compressor.models.segmenters import final_convs


def segmentation_classes() -> set[str]:
    """The class names of transformers' semantic-segmentation Auto mapping."""
    from transformers.models.auto import modeling_auto as auto

    return {name for value in auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.values()
            for name in ((value,) if isinstance(value, str) else value)}


def names_segmenter(config) -> bool:
    """Whether config.json's architectures name a semantic segmenter (the directory holds its decode head)."""
    return bool(set(getattr(config, "architectures", None) or []) & segmentation_classes())


class HFSegmenter(HFLogits):
    """A Hugging Face semantic segmenter called on pixel values, its logits upsampled to the input size."""

    dynamic_size = True  # exported with any height and width (compressor/deploy/export.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if tuple(logits.shape[-2:]) == tuple(x.shape[-2:]):
            return logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def protected_modules(self) -> list[str]:
        """The convolutions producing the class channels (SegFormer: model.decode_head.classifier), found on one
        probe forward (compressor/models/segmenters.final_convs)."""
        return final_convs(self)

    def __getstate__(self) -> dict:
        """Pickled (model.pt, deepcopy) without transformers' output-capturing hooks (see without_capture_hooks)."""
        without_capture_hooks(self)
        return super().__getstate__()


CAPTURE_MODULE = "transformers.utils.output_capturing"


def without_capture_hooks(module: nn.Module) -> None:
    """Remove the forward hooks transformers installs to collect hidden states (closures: they cannot be pickled)
    and mark the models unhooked, so the next forward installs them again. SegFormer's decode head reads every
    stage's output, so its forward always asks for them."""
    for m in module.modules():
        for key, hook in list(m._forward_hooks.items()):
            if getattr(hook, "__module__", None) == CAPTURE_MODULE:
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
        if getattr(m, "_output_capturing_hooks_installed", False):
            m._output_capturing_hooks_installed = False


def load_hf_segmenter(transformers, path: Path, directory: str, config, num_classes: int,
                      in_channels: int) -> HFSegmenter:
    """The segmenter saved in `path` (its config.json names a *ForSemanticSegmentation class); ModelLoadError when
    model.num_classes / model.in_channels differ from the config's num_labels / num_channels or the weights do not
    load."""
    problems = []
    if int(config.num_labels) != int(num_classes):
        problems.append(f"model.num_classes is {num_classes}, the model's config.json has num_labels "
                        f"{config.num_labels}")
    channels = getattr(config, "num_channels", None)
    if channels is not None and int(channels) != int(in_channels):
        problems.append(f"model.in_channels is {in_channels}, the model's config.json has num_channels {channels}")
    if problems:
        raise ModelLoadError(f"hf:{directory}: " + "; ".join(problems) + ".",
                             hint="Set model.num_classes (the mask classes, background included) and "
                                  "model.in_channels in the recipe to the model's values.")
    model = from_pretrained_checked(transformers, transformers.AutoModelForSemanticSegmentation, path, config,
                                    directory, "a semantic segmenter")
    return HFSegmenter(model.eval(), "pixel_values")


def describe_stage_widths(model: nn.Module, config) -> None:
    """Set what a SegFormer config can say about pruned widths (models/hf_export.config_for then compares every
    tensor with a model built from it): a stage's MLP ratio when its blocks share one hidden width that is a
    whole multiple of the stage's hidden size (transformers builds int(hidden_size * mlp_ratio) and its config takes
    integer ratios only: prune.round_to a multiple of the hidden sizes keeps them so), and decoder_hidden_size when
    every decode-head projection and the fuse convolution keep one width."""
    ratios, hidden = getattr(config, "mlp_ratios", None), getattr(config, "hidden_sizes", None)
    if isinstance(ratios, (list, tuple)) and isinstance(hidden, (list, tuple)) and len(ratios) == len(hidden):
        ratios = list(ratios)
        for stage, size in enumerate(hidden):
            pattern = re.compile(rf"(^|\.)stages\.{stage}\.blocks\.\d+\.mlp\.fc1$")
            widths = {m.out_features for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and pattern.search(name)}
            if len(widths) == 1 and next(iter(widths)) % int(size) == 0:
                ratios[stage] = next(iter(widths)) // int(size)
        config.mlp_ratios = ratios
    head = getattr(model, "decode_head", None)
    if hasattr(config, "decoder_hidden_size") and head is not None:
        widths = {m.out_features for name, m in head.named_modules()
                  if isinstance(m, nn.Linear) and name.startswith("linear_projections.")}
        fuse = getattr(head, "linear_fuse", None)
        if isinstance(fuse, nn.Conv2d):
            widths.add(fuse.out_channels)
        if len(widths) == 1:
            config.decoder_hidden_size = widths.pop()
