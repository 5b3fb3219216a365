"""The static rule for channel multiples, by instruction set and GPU precision: the estimate `prune.round_to: auto`
falls back on where it cannot measure (inspect, GPU backends; round_to.py measures on CPUs).

Pruning to arbitrary widths can make a model slower than dense (measured: the quickstart ResNet-20 at half the MACs
ran x0.86 on ONNX Runtime CPU with odd widths, x1.59 with widths rounded to 8, on an AVX2 EPYC). ONNX Runtime CPU
runs convolutions in MLAS's NCHWc layout with channel blocks of 8 floats (AVX2) or 16 (AVX-512F); depending on the
version and CPU, a convolution whose channel counts are not a multiple of the block either leaves that layout
(NCHW with layout conversions around it, seen with AVX2) or is padded up to the next block (seen with onnxruntime
1.32 on AVX-512), and both cost time (`compressor profile` shows the layouts). On NVIDIA GPUs the tensor-core kernels
TensorRT picks want channel multiples of 8 for FP16 and 32 for INT8 (its CHW32 format).
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.deploy.runners import gpu_backends

if TYPE_CHECKING:
    from compressor.app.recipe import Recipe



@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo: `flags` on x86, `Features` on ARM; empty
    elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def ort_cpu_block(flags: frozenset[str] | None = None, machine: str | None = None) -> int:
    """The channel block ONNX Runtime's CPU provider (MLAS NCHWc) uses on this machine."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64") and "avx512f" in flags:
        return 16
    return 8  # AVX2 on x86; on ARM 8 keeps NEON's 4-float vectors and FP16's 8-lane vectors full


def auto_round_to(recipe: "Recipe", flags: frozenset[str] | None = None, machine: str | None = None) -> tuple[int, str]:
    """The channel multiple `round_to: auto` resolves to for this recipe's targets, and why."""
    backends = set(recipe.bench.backends)
    trt = recipe.export.tensorrt
    choices: list[tuple[int, str]] = []
    if "ort-cpu" in backends or not backends & gpu_backends():
        block = ort_cpu_block(flags, machine)
        choices.append((block, f"ONNX Runtime CPU runs convolutions in blocks of {block} channels on this CPU"))
    if backends & gpu_backends() or trt.enabled is True:
        if trt.int8:
            choices.append((32, "TensorRT INT8 tensor-core kernels use channel blocks of 32"))
        else:
            choices.append((8, "GPU tensor-core kernels want channel multiples of 8"))
    value = max(value for value, _ in choices)
    reasons = "; ".join(reason for v, reason in choices if v == value)
    return value, reasons
