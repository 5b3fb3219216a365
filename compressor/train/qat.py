"""Quantization-aware fine-tuning (export.quantize.qat): fake int8 quantization of every Conv/Linear weight and
input while the pruned model trains a little longer, so that its weights settle where int8 rounding costs
least. The fake quantization mirrors what onnxruntime's static QDQ quantizer then applies to the exported model
(docs/quantization.md):

- weights: symmetric int8 (7-bit with reduce_range), one scale per output channel (or per tensor). Per channel,
  it is exact even though the export folds BatchNorm into the convolution: folding multiplies each output channel
  by a constant, and a symmetric per-channel grid scales with it.
- inputs: uint8 with a zero point (or symmetric int8), the range tracked as a running min / max, as minmax
  calibration measures it.

Gradients pass the rounding straight through (torch's fake-quantize ops). Afterwards the fake quantization is
removed and the float weights stay; the int8 file is made from them by the same quantizer as post-training int8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

QUANTIZED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class WeightFakeQuant(nn.Module):
    """Symmetric fake quantization of a weight to 2 x qmax + 1 levels, per output channel or per tensor."""

    def __init__(self, qmax: int, per_channel: bool) -> None:
        super().__init__()
        self.qmax, self.per_channel = qmax, per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            scale = (w.detach().abs().flatten(1).amax(1) / self.qmax).clamp_min(1e-12).float()
            zero = torch.zeros_like(scale, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)
        scale = float((w.detach().abs().max() / self.qmax).clamp_min(1e-12))
        return torch.fake_quantize_per_tensor_affine(w, scale, 0, -self.qmax, self.qmax)


class InputFakeQuant:
    """Forward pre-hook: fake-quantizes a layer's input with the running min / max seen in training."""

    def __init__(self, symmetric: bool, momentum: float = 0.01) -> None:
        self.symmetric, self.momentum = symmetric, momentum
        self.low: float | None = None
        self.high: float | None = None

    def observe(self, x: torch.Tensor) -> None:
        low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low += self.momentum * (low - self.low)
            self.high += self.momentum * (high - self.high)

    def __call__(self, module: nn.Module, args):
        x = args[0]
        if module.training:
            self.observe(x.detach())
        if self.low is None or self.high - self.low <= 0:
            return None
        if self.symmetric:
            scale = max(abs(self.low), abs(self.high)) / 127.0
            return (torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127), *args[1:])
        scale = (self.high - self.low) / 255.0
        zero = int(min(255, max(0, round(-self.low / scale))))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), *args[1:])


@dataclass
class FakeQuantized:
    """What attach() changed, so that detach() can undo it exactly."""

    modules: list[str]
    handles: list


def attach(model: nn.Module, *, symmetric_inputs: bool, reduce_range: bool, per_channel: bool,
           skip: Iterable[str] = ()) -> FakeQuantized:
    """Fake-quantize every Conv/Linear of `model` except the `skip` module names (layers kept in float)."""
    skip = set(skip)
    qmax = 63 if reduce_range else 127
    names, handles = [], []
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZED_TYPES) or name in skip:
            continue
        parametrize.register_parametrization(module, "weight", WeightFakeQuant(qmax, per_channel))
        handles.append(module.register_forward_pre_hook(InputFakeQuant(symmetric_inputs)))
        names.append(name)
    return FakeQuantized(names, handles)


def detach(model: nn.Module, state: FakeQuantized) -> None:
    """Remove the fake quantization; the trained float weights stay."""
    for handle in state.handles:
        handle.remove()
    for name in state.modules:
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=False)
