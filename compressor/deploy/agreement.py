"""Top-1 agreement of two outputs of one model (PyTorch vs an export, fp32 vs a quantized copy), shared by the
parity checks (verify.py) and the int8 sensitivity scan (quantize.py). numpy only: it runs where onnxruntime does."""
from __future__ import annotations

from typing import Optional

import numpy as np

CLASS_AXIS = 1  # (N, classes, ...): logits, or a segmentation map's per-pixel logits (N, classes, H, W)


def top_classes(output: np.ndarray) -> Optional[np.ndarray]:
    """The top class of every prediction (one per sample, or per pixel / position); None for an output without a
    class axis of two or more classes ((N,) or (N, 1): nothing to agree on)."""
    if output.ndim < 2 or output.shape[CLASS_AXIS] < 2:
        return None
    return output.argmax(CLASS_AXIS)


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> Optional[float]:
    """The share of predictions whose top class is the same in both outputs; None where there are no classes."""
    ours, theirs = top_classes(reference), top_classes(candidate)
    return None if ours is None or theirs is None else float(np.mean(ours == theirs))
