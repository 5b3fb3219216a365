"""Factories for the `python:` model references exercised in test_models.py."""
from __future__ import annotations

from torch import nn


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A two-layer CNN that honours num_classes and in_channels."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def no_kwargs() -> nn.Module:
    """A factory that takes no arguments at all."""
    return nn.Linear(3, 2)


def not_a_module() -> int:
    """A factory that returns something other than an nn.Module."""
    return 42


class ScaledNet(nn.Module):
    """A CNN with a bare nn.Parameter (a per-channel scale) that torch-pruning cannot attribute to a layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        import torch

        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.conv(x) * self.scale)


def with_custom_scale(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ScaledNet(num_classes, in_channels)
