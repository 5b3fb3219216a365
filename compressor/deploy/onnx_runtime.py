"""ONNX Runtime sessions for the ort-* backends, and the one way compressor runs a session on data (run_onnx: the
feed cast to what the model's input declares, float32 out). No torch import: this runs on devices with only
onnxruntime.

A requested provider that the session did not actually get (onnxruntime silently falls back to the CPU) is
BackendUnavailable: a CPU number is never reported under a GPU backend's name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from compressor.errors import BackendUnavailable, UsageError

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}  # integers: a text model's token ids

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
        both = [d for d in ("onnxruntime", "onnxruntime-gpu") if installed(d)]
        if len(both) == 2:  # one package directory, two wheels: whichever installed last decides the providers
            raise BackendUnavailable(
                f"backend {backend} needs onnxruntime's {wanted}, but both onnxruntime and onnxruntime-gpu are "
                f"installed; they share one package directory, and the CPU-only files won ({', '.join(available)}).",
                hint="Keep only the GPU build: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                     "onnxruntime-gpu (the [gpu] extra does this order for you only in a fresh environment).")
        raise BackendUnavailable(
            f"backend {backend} needs onnxruntime's {wanted}, but this onnxruntime "
            f"({ort.__version__}) offers only {', '.join(available)}.",
            hint="Install the [gpu] extra (onnxruntime-gpu, tensorrt) on a machine with an NVIDIA GPU and driver.",
        )
    return ort


def installed(distribution: str) -> bool:
    """Whether a pip distribution is installed (without importing it)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def load_gpu_libraries(ort, backend: str) -> list[str]:
    """Load what the CUDA and TensorRT providers link against before a session is made: onnxruntime's
    preload_dlls() (CUDA and cuDNN from the nvidia-* wheels, onnxruntime-gpu >= 1.21) and, for ort-trt, the
    tensorrt package's libraries (importing it loads libnvinfer). Returns what was loaded; failures are left to
    the session check, which names the provider that did not start."""
    loaded = []
    if backend == "ort-cpu":
        return loaded
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
            loaded.append("onnxruntime.preload_dlls")
        except Exception:  # noqa: BLE001 - a library that does not load shows up as a provider that did not start
            pass
    if backend == "ort-trt":
        try:
            import tensorrt  # noqa: F401
            loaded.append("tensorrt")
        except Exception:  # noqa: BLE001 - same: the session check reports the missing TensorRT provider
            pass
    return loaded


def create_session(path: str | Path, backend: str = "ort-cpu", *, threads: Optional[int] = None,
                   fp16: bool = False, cache_dir: Optional[Path] = None, profile_prefix: Optional[str] = None,
                   spinning: bool = True):
    """An InferenceSession on exactly the backend asked for, or BackendUnavailable (exit 3). With
    `profile_prefix`, onnxruntime's profiler records every node's kernel time (`session.end_profiling()`).
    `spinning=False` stops the session's thread pools from spinning while idle: sessions timed in turn must not,
    or the idle one's spinning threads take the cores from the one being timed (on 2 cores an interleaved ResNet-18
    at batch 1 took 52 ms with spinning, 26 ms without, and 27 ms alone)."""
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
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    load_gpu_libraries(ort, backend)
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


# ---------------------------------------------------------------------------------------------- running a session
def model_input(session: Any, source: str = "the ONNX model") -> tuple[Any, Any]:
    """The session's one input and the numpy dtype it takes; UsageError (exit 2) naming `source` for a model with
    several inputs or an input type compressor does not feed (it feeds images as floats and text as token ids)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise UsageError(f"{source} has {len(inputs)} inputs ({names}); compressor feeds models with exactly one "
                         "input (an image batch, or a text model's token ids).")
    if inputs[0].type not in ORT_DTYPES:
        raise UsageError(f"{source} takes {inputs[0].type} as {inputs[0].name!r}; compressor feeds float inputs "
                         "(float32, float16, double) and int32/int64 token ids only.")
    return inputs[0], np.dtype(ORT_DTYPES[inputs[0].type])


def _numpy(inputs: Any) -> np.ndarray:
    """A numpy array of a numpy array or a (CPU or GPU) torch tensor, without importing torch."""
    return np.asarray(inputs.detach().cpu().numpy() if hasattr(inputs, "detach") else inputs)


def onnx_feed(session: Any, inputs: Any, source: str = "the ONNX model") -> dict[str, np.ndarray]:
    """The feed of a one-input session: `inputs` (a numpy array or a torch tensor) cast to the dtype the model's
    input declares (float32, or float16 for an fp16 file without float32 io; int64 / int32 token ids). Float data
    for an integer input is a UsageError: token ids are never made by truncating floats."""
    node, dtype = model_input(session, source)
    data = _numpy(inputs)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(data.dtype, np.integer):
        raise UsageError(f"{source} takes {dtype} token ids as {node.name!r}, but the data is {data.dtype}; give "
                         "token ids (a text dataset's input_ids), not float features.")
    return {node.name: np.ascontiguousarray(data.astype(dtype, copy=False))}


def run_onnx_outputs(session: Any, inputs: Any, *, batch_size: Optional[int] = None,
                     source: str = "the ONNX model") -> list[np.ndarray]:
    """Every output of the session on `inputs` as float32, in the graph's order (a detector's boxes and scores);
    in slices of `batch_size` samples as run_onnx."""
    data = _numpy(inputs)

    def outputs(part: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float32) for o in session.run(None, onnx_feed(session, part, source))]

    if not batch_size or len(data) <= batch_size:
        return outputs(data)
    parts = [outputs(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]
    return [np.concatenate(column) for column in zip(*parts)]


def run_onnx(session: Any, inputs: Any, *, batch_size: Optional[int] = None,
             source: str = "the ONNX model") -> np.ndarray:
    """The session's first output on `inputs` as float32 (an fp16 model's output upcast), run in slices of
    `batch_size` samples along the first axis when given (in one run otherwise); see onnx_feed for the input."""
    return run_onnx_outputs(session, inputs, batch_size=batch_size, source=source)[0]
