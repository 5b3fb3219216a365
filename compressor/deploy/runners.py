"""What every bench backend is: the Runner contract, its options, the BACKENDS registry, the seeded input, and the
ONNX file checks that several backends share. No torch import (see compressor/deploy/backends)."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from compressor.deploy.onnx_runtime import create_session
from compressor.errors import BackendUnavailable, CompressorError, ModelLoadError, UsageError
from compressor.registry import Registry
from compressor.tokens import TOKEN_ID_RANGE

SEED = 0
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")


class Runner(abc.ABC):
    """Runs one model on one backend: `prepare(batch)` builds the input, `run_once()` is what gets timed.
    Registered with @BACKENDS.register(name) in a module of compressor/deploy/backends."""

    name = "runner"
    gpu = False  # runs on an NVIDIA GPU (round_to: auto then measures nothing and takes the GPU multiples)

    @classmethod
    def require(cls) -> None:
        """Raise BackendUnavailable (exit 3) when this backend cannot run on this machine (runtime, provider or
        GPU missing); called before any long work."""

    @abc.abstractmethod
    def prepare(self, batch_size: int) -> None:
        """Build the input for `batch_size` (and whatever buffers it needs)."""

    @abc.abstractmethod
    def run_once(self) -> None:
        """One inference on the prepared input."""

    def close(self) -> None:
        """Release the session or restore global settings; the runner is not used afterwards."""


@dataclass(frozen=True)
class RunnerOptions:
    """Settings every runner is built with; a backend ignores those that do not concern it."""

    threads: Optional[int] = None
    input_shape: Optional[tuple[int, ...]] = None
    trust_checkpoint: bool = False
    fp16: bool = False  # ort-trt: let the TensorRT provider use FP16 kernels
    cache_dir: Optional[Path] = None  # ort-trt: engine cache folder (reused across runs)
    profile_prefix: Optional[str] = None  # ort-*: record per-node kernel times with onnxruntime's profiler
    spinning: bool = True  # ort-*: idle thread pools spin; False whenever several runners are timed in turn
    # samples (P, *sample shape) every batch is drawn from instead of random_input (a detector's validation images:
    # NMS in the graph costs what the content makes it); see bench_input
    inputs: Optional[Any] = field(default=None, compare=False)


BACKENDS: Registry[Callable[[Any, RunnerOptions], Runner]] = Registry("backend")


def random_input(shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """The seeded input every runner times, so a model and its baseline see identical data: standard normal
    floats, or token ids in [0, TOKEN_ID_RANGE) for an integer input (compressor/tokens.py)."""
    rng = np.random.default_rng(SEED)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(0, TOKEN_ID_RANGE, tuple(shape)).astype(dtype)
    return rng.standard_normal(tuple(shape)).astype(dtype)


def bench_input(shape: Sequence[int], dtype: Any = np.float32, pool: Optional[Any] = None) -> np.ndarray:
    """The input a runner times at `shape` (batch first): random_input, or with a `pool` of samples (P, *sample
    shape: a numpy array or a CPU tensor) its first `shape[0]` samples, cycling when the batch is larger than the
    pool, so every runner and batch size sees the same images. A pool of another sample shape is a UsageError."""
    if pool is None:
        return random_input(shape, dtype)
    data = np.asarray(pool.detach().cpu().numpy() if hasattr(pool, "detach") else pool)
    if data.ndim < 1 or len(data) == 0 or tuple(data.shape[1:]) != tuple(int(d) for d in shape[1:]):
        raise UsageError(f"the bench inputs hold samples of shape {tuple(data.shape[1:])} (and {len(data)} of them), "
                         f"but the model takes {tuple(int(d) for d in shape[1:])}; give samples of the model's "
                         "input shape.")
    return np.ascontiguousarray(data[np.arange(int(shape[0])) % len(data)].astype(dtype, copy=False))


def _model_path(model: Any) -> Path:
    """The model's file, or UsageError naming it when it does not exist."""
    path = Path(model)
    if not path.exists():
        raise UsageError(f"model file {str(path)!r} does not exist.")
    return path


ORT_FILE_ERRORS = ("InvalidProtobuf", "NoSuchFile", "InvalidGraph", "InvalidArgument", "NotImplemented")
ONNX_HINT = "Give an ONNX model written by `compressor export` (or torch.onnx.export); check the path."


def _ort_reason(exc: BaseException) -> str:
    """onnxruntime's message without its `[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:`."""
    text = " ".join(str(exc).split())
    return text.rsplit("failed:", 1)[-1].strip() or type(exc).__name__


def _onnx_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model file {str(path)!r} does not exist.")
    if path.is_dir():
        raise UsageError(f"{str(path)!r} is a directory, not an ONNX model file.")
    return path


def load_onnx_proto(path: str | Path) -> Any:
    """The parsed ONNX graph of `path` (without external data), or a CompressorError naming the file (exit 2): missing,
    a directory, or bytes that are not an ONNX model. None when the onnx package is not installed."""
    path = _onnx_path(path)
    try:
        import onnx
    except ImportError:
        return None
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError mostly; whatever the parser raises, the file is not a model it reads
        raise ModelLoadError(f"{str(path)!r} is not an ONNX model ({type(exc).__name__}: {_ort_reason(exc)}).",
                             hint=ONNX_HINT) from exc
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelLoadError(f"{str(path)!r} is not an ONNX model (it holds no graph).", hint=ONNX_HINT)
    return proto


def check_onnx_file(path: str | Path) -> Path:
    """`path` when it holds an ONNX model, else a CompressorError naming it (see load_onnx_proto); without the onnx
    package only existence is checked and onnxruntime's load decides."""
    load_onnx_proto(path)
    return Path(path)


def open_onnx_session(path: str | Path, backend: str = "ort-cpu", **options: Any):
    """onnx_runtime.create_session, with a file onnxruntime cannot load reported as an error naming it (exit 2)
    instead of onnxruntime's own exception; a session failure on a GPU backend is BackendUnavailable (exit 3)."""
    path = _onnx_path(path)
    try:
        return create_session(path, backend, **options)
    except CompressorError:
        raise
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        if type(exc).__name__ in ORT_FILE_ERRORS or backend == "ort-cpu":
            raise ModelLoadError(f"onnxruntime cannot load {str(path)!r} ({_ort_reason(exc)}); it is not a valid "
                                 "ONNX model.", hint=ONNX_HINT) from exc
        raise BackendUnavailable(f"backend {backend}: onnxruntime could not create a session for {str(path)!r} "
                                 f"({_ort_reason(exc)}).",
                                 hint="Check the CUDA/cuDNN/TensorRT libraries and the NVIDIA driver.") from exc


def _onnx_input_shape(dims: Sequence[Any], batch_size: int, input_shape: Optional[Sequence[int]],
                      example: str = "3,224,224") -> list[int]:
    """The ONNX input's shape at `batch_size`: dynamic batch filled in, other dims fixed or from --input-shape
    (`example`: what the error suggests)."""
    batch_dim, sample_dims = dims[0], list(dims[1:])
    if isinstance(batch_dim, int) and batch_dim != batch_size:
        raise UsageError(f"the ONNX model has a fixed batch size of {batch_dim}; it cannot run batch {batch_size}. "
                         "Export it with a dynamic batch axis.")
    if input_shape is not None:
        if len(input_shape) != len(sample_dims) or any(isinstance(d, int) and d != given
                                                       for d, given in zip(sample_dims, input_shape)):
            raise UsageError(f"--input-shape {','.join(map(str, input_shape))} does not fit the ONNX input {dims} "
                             "(batch axis first, not part of --input-shape).")
        return [batch_size, *input_shape]
    if not all(isinstance(d, int) and d > 0 for d in sample_dims):
        raise UsageError(f"the ONNX input {dims} has dynamic dims besides the batch; "
                         f"give --input-shape, e.g. {example}.")
    return [batch_size, *sample_dims]




def gpu_backends() -> set[str]:
    """The registered backends that run on a GPU."""
    import compressor.deploy.backends  # noqa: F401  (registers the backends)

    return {name for name in BACKENDS.names() if BACKENDS.get(name).gpu}


def check_backend(backend: str) -> None:
    """Fail now (BackendUnavailable, exit 3) when `backend` cannot run on this machine, before any long work."""
    import compressor.deploy.backends  # noqa: F401  (registers the backends)

    BACKENDS.get(backend).require()
