"""Native TensorRT inference without torch: deserialize an engine, set input shapes, device buffers through
cuda-python, one CUDA stream, CUDA-event timing. Runs on a Jetson or GPU box with only tensorrt, cuda-python
and numpy installed. Written against TensorRT 10 and 11 (the [gpu] extra takes tensorrt>=10.3,<12) and cuda-python 12/13.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from compressor.errors import BackendUnavailable, UsageError


def nvidia_gpus() -> list[dict[str, str]]:
    """Name and driver of each NVIDIA GPU per nvidia-smi (empty without a driver or GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.rsplit(",", 1) for line in done.stdout.splitlines() if "," in line]
    return [{"name": n.strip(), "driver": d.strip()} for n, d in rows] if done.returncode == 0 else []


def tensorrt_missing() -> list[str]:
    """What this machine lacks for TensorRT: the package, cuda-python, an NVIDIA GPU (empty when complete)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the tensorrt Python package")
    if importlib.util.find_spec("cuda") is None:
        missing.append("cuda-python")
    if not nvidia_gpus():
        missing.append("an NVIDIA GPU with a working driver (nvidia-smi lists none)")
    return missing


def require_tensorrt(what: str = "backend tensorrt") -> None:
    """BackendUnavailable (exit 3) naming everything missing for TensorRT on this machine."""
    missing = tensorrt_missing()
    if missing:
        raise BackendUnavailable(f"{what} needs {', '.join(missing)}.",
                                 hint="Install the [gpu] extra (pip install -e '.[gpu]') on a machine with an NVIDIA GPU.")


_PLUGIN_LOGGER: list[Any] = []  # the logger TensorRT's plugin library was initialised with (it keeps the pointer)


def register_plugins(trt) -> None:
    """Register TensorRT's own plugins (EfficientNMS_TRT among them) in its plugin registry, once per process: the
    ONNX parser looks a plugin node's creator up there, and deserializing an engine with a plugin layer needs it.
    tensorrt.init_libnvinfer_plugins(logger, namespace) per TensorRT's Python API ("should be called once before
    accessing the Plugin Registry"), with the default namespace ""; the logger stays referenced for the process."""
    if _PLUGIN_LOGGER:
        return
    logger = trt.Logger(trt.Logger.WARNING)
    if not trt.init_libnvinfer_plugins(logger, ""):
        raise BackendUnavailable("TensorRT's plugin library (libnvinfer_plugin) could not be initialised.",
                                 hint="Check the TensorRT installation: the tensorrt package ships libnvinfer_plugin.")
    _PLUGIN_LOGGER.append(logger)


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result):
    """cuda-python calls return (err, *values); raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


class TrtEngine:
    """One deserialized engine with device buffers for a batch size; `run()` times H2D + compute + D2H."""

    def __init__(self, engine_path: str | Path) -> None:
        require_tensorrt()
        import tensorrt as trt

        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        register_plugins(trt)  # an engine holding a plugin layer (EfficientNMS_TRT) deserializes only after this
        data = Path(engine_path).read_bytes()
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(data)
        if self.engine is None:
            raise UsageError(f"{engine_path} is not a TensorRT engine for this TensorRT version and GPU.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1:
            raise UsageError(f"{engine_path} has {len(self.inputs)} inputs; compressor benchmarks single-input models.")
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.events = [_check(self.cudart.cudaEventCreate()) for _ in range(4)]
        self.device: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self.gpu_ms: list[float] = []

    def input_shape(self) -> list[int]:
        return list(self.engine.get_tensor_shape(self.inputs[0]))

    def prepare(self, inputs: np.ndarray) -> None:
        """Allocate buffers for this input's shape (the optimisation profile must cover it)."""
        self.free()
        name = self.inputs[0]
        dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
        self.host[name] = np.ascontiguousarray(inputs.astype(dtype))
        if not self.context.set_input_shape(name, tuple(inputs.shape)):
            raise UsageError(f"input shape {tuple(inputs.shape)} is outside the engine's optimisation profile; "
                             "rebuild it with --batch covering this batch size.")
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            self.host[out] = np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(out)))
        for tensor, array in self.host.items():
            self.device[tensor] = _check(self.cudart.cudaMalloc(max(array.nbytes, 1)))
            self.context.set_tensor_address(tensor, int(self.device[tensor]))

    def run(self) -> dict[str, np.ndarray]:
        """H2D copy, inference, D2H copy on the stream; records the GPU compute time in gpu_ms."""
        cudart, name = self.cudart, self.inputs[0]
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        start, compute_start, compute_end, end = self.events
        _check(cudart.cudaEventRecord(start, self.stream))
        _check(cudart.cudaMemcpyAsync(self.device[name], self.host[name].ctypes.data, self.host[name].nbytes, h2d, self.stream))
        _check(cudart.cudaEventRecord(compute_start, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cudart.cudaEventRecord(compute_end, self.stream))
        for out in self.outputs:
            _check(cudart.cudaMemcpyAsync(self.host[out].ctypes.data, self.device[out], self.host[out].nbytes, d2h, self.stream))
        _check(cudart.cudaEventRecord(end, self.stream))
        _check(cudart.cudaEventSynchronize(end))
        self.gpu_ms.append(float(_check(cudart.cudaEventElapsedTime(compute_start, compute_end))))
        return {out: self.host[out].copy() for out in self.outputs}

    def free(self) -> None:
        for ptr in self.device.values():
            self.cudart.cudaFree(ptr)
        self.device, self.host = {}, {}

    def close(self) -> None:
        self.free()
        for event in self.events:
            self.cudart.cudaEventDestroy(event)
        self.cudart.cudaStreamDestroy(self.stream)

    def infer(self, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Outputs of the first output tensor for all inputs, in batches."""
        results: list[Any] = []
        for i in range(0, len(inputs), batch_size):
            self.prepare(inputs[i:i + batch_size])
            results.append(self.run()[self.outputs[0]])
        return np.concatenate(results)
