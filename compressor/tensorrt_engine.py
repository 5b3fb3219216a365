"""TensorRT: availability on this machine (the engine build and runtime need the tensorrt package and a GPU)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess


def nvidia_gpu_present() -> tuple[bool, str]:
    """Whether an NVIDIA GPU with a working driver is visible (nvidia-smi), without importing torch."""
    if shutil.which("nvidia-smi") is None:
        return False, "no NVIDIA driver (nvidia-smi not found)"
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi failed ({exc})"
    if listing.returncode != 0 or "GPU" not in listing.stdout:
        return False, "nvidia-smi lists no GPU"
    return True, listing.stdout.splitlines()[0]


def tensorrt_available() -> tuple[bool, str]:
    """(True, description) when a TensorRT engine can be built and run here, else (False, what is missing)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed (pip install -e '.[gpu]')"
    gpu, why = nvidia_gpu_present()
    if not gpu:
        return False, f"there is no usable NVIDIA GPU: {why}"
    return True, why
