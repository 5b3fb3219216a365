"""ONNX Runtime sessions for the ort-* backends. No torch import: this runs on devices with only onnxruntime.

A requested provider that the session did not actually get (onnxruntime silently falls back to the CPU) is
BackendUnavailable: a CPU number is never reported under a GPU backend's name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from compressor.errors import BackendUnavailable, UsageError

PRIMARY_PROVIDER = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed.",
                                 hint="pip install onnxruntime (or onnxruntime-gpu for the CUDA/TensorRT providers).") from exc
    return onnxruntime


def provider_chain(backend: str, *, fp16: bool = False, cache_dir: Optional[Path] = None,
                   device_id: int = 0) -> list[Any]:
    """The providers list (with options) that InferenceSession gets for a backend."""
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if backend == "ort-cuda":
        return [cuda, "CPUExecutionProvider"]
    if backend == "ort-trt":
        options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": fp16}
        if cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        return [("TensorrtExecutionProvider", options), cuda, "CPUExecutionProvider"]
    raise UsageError(f"{backend!r} is not an ONNX Runtime backend; use one of {', '.join(PRIMARY_PROVIDER)}.")


def require_provider(backend: str):
    """The onnxruntime module when its build offers `backend`'s provider; BackendUnavailable (exit 3) otherwise."""
    ort = _import_ort()
    wanted = PRIMARY_PROVIDER.get(backend)
    if wanted is None:
        provider_chain(backend)  # raises the UsageError naming the allowed backends
    available = ort.get_available_providers()
    if wanted not in available:
        raise BackendUnavailable(
            f"backend {backend} needs onnxruntime's {wanted}, but this onnxruntime "
            f"({ort.__version__}) offers only {', '.join(available)}.",
            hint="Install the [gpu] extra (onnxruntime-gpu, tensorrt) on a machine with an NVIDIA GPU and driver.",
        )
    return ort


def create_session(path: str | Path, backend: str = "ort-cpu", *, threads: Optional[int] = None,
                   fp16: bool = False, cache_dir: Optional[Path] = None, profile_prefix: Optional[str] = None):
    """An InferenceSession on exactly the backend asked for, or BackendUnavailable (exit 3). With
    `profile_prefix`, onnxruntime's profiler records every node's kernel time (`session.end_profiling()`)."""
    ort = require_provider(backend)
    wanted = PRIMARY_PROVIDER[backend]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=provider_chain(backend, fp16=fp16, cache_dir=cache_dir))
    got = session.get_providers()
    if not got or got[0] != wanted:
        raise BackendUnavailable(
            f"backend {backend}: onnxruntime could not start {wanted} (the session fell back to "
            f"{', '.join(got) or 'nothing'}); no {backend} number is reported.",
            hint="Check the CUDA/cuDNN/TensorRT libraries and the NVIDIA driver on this machine.",
        )
    return session
