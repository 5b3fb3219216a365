"""Batch-norm statistics re-estimated on training batches after pruning (finetune.bn_recalibration).

Removing or zeroing channels changes what every later layer sees, but the running means and variances of the
batch-norm layers still describe the dense model, or an exponential average over the last training steps before
the last removal. Re-estimating them costs a few forward passes and no training: the model runs in eval mode
(dropout off) with only its batch-norm layers in training mode, each layer's statistics reset and accumulated as
a plain average over the batches (momentum None), then the layers' settings are restored.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers that keep running statistics (BatchNorm1d/2d/3d, SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Any], device: torch.device,
                           channels_last: bool = False) -> dict[str, int]:
    """Reset and re-estimate the running statistics of every batch-norm layer from `batches` ((inputs, targets)
    pairs); returns {layers, batches, samples}. A model without such layers is left untouched."""
    norms = batch_norms(model)
    if not norms:
        return {"layers": 0, "batches": 0, "samples": 0}
    was_training = model.training
    saved = [(m, m.momentum, m.training) for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an exponential one
        m.train()
    seen = samples = 0
    try:
        for inputs, _ in batches:
            if channels_last and inputs.ndim == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            model(inputs.to(device))
            seen += 1
            samples += len(inputs)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return {"layers": len(norms), "batches": seen, "samples": samples}
