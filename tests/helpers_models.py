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
