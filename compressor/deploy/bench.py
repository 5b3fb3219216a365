"""Latency benchmarks: backend runners, statistics, interleaved A/B timing, batch sweeps, environment capture.

No torch import here outside the `torch` backend: benchmarking an .onnx or TensorRT file works on a device
that has only numpy and onnxruntime (or tensorrt) installed.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from compressor.deploy.onnx_runtime import create_session, require_provider
from compressor.deploy.tensorrt_runtime import nvidia_gpus, require_tensorrt
from compressor.errors import BackendUnavailable, CompressorError, ModelLoadError, UsageError
from compressor.progress import Tracker, track
from compressor.registry import Registry

if TYPE_CHECKING:
    from rich.console import Console

SEED = 0
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class Runner(abc.ABC):
    """Runs one model on one backend: `prepare(batch)` builds the input, `run_once()` is what gets timed."""

    name = "runner"

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


BACKENDS: Registry[Callable[[Any, RunnerOptions], Runner]] = Registry("backend")


def random_input(shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """The seeded input every runner times, so a model and its baseline see identical data."""
    return np.random.default_rng(SEED).standard_normal(tuple(shape)).astype(dtype)


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


def _onnx_input_shape(dims: Sequence[Any], batch_size: int, input_shape: Optional[Sequence[int]]) -> list[int]:
    """The ONNX input's shape at `batch_size`: dynamic batch filled in, other dims fixed or from --input-shape."""
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
                         "give --input-shape, e.g. 3,224,224.")
    return [batch_size, *sample_dims]


class OrtRunner(Runner):
    """An ONNX Runtime session on exactly the provider its backend names (ort-cpu, ort-cuda, ort-trt)."""

    def __init__(self, backend: str, model: Any, options: RunnerOptions) -> None:
        path = _model_path(model)
        if path.suffix not in ONNX_SUFFIXES:
            raise UsageError(f"backend {backend} runs .onnx files, not {path.name!r}; "
                             "use --backend torch for PyTorch models.")
        self.name, self.input_shape = backend, options.input_shape
        self.session = open_onnx_session(path, backend, threads=options.threads, fp16=options.fp16,
                                         cache_dir=options.cache_dir, profile_prefix=options.profile_prefix)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UsageError(f"{path.name!r} has {len(inputs)} inputs; bench feeds models with exactly one input.")
        self.input = inputs[0]
        if self.input.type not in ORT_DTYPES:
            raise UsageError(f"{path.name!r} takes {self.input.type}; bench feeds float inputs only.")
        self.feed: dict[str, np.ndarray] = {}

    def prepare(self, batch_size: int) -> None:
        shape = _onnx_input_shape(self.input.shape, batch_size, self.input_shape)
        self.feed = {self.input.name: random_input(shape, ORT_DTYPES[self.input.type])}

    def run_once(self) -> None:
        self.session.run(None, self.feed)

    def close(self) -> None:
        self.session = None


for _backend in ("ort-cpu", "ort-cuda", "ort-trt"):
    BACKENDS.register(_backend)(functools.partial(OrtRunner, _backend))


@BACKENDS.register("tensorrt")
class TensorRTRunner(Runner):
    """A native TensorRT engine (.engine/.plan): host latency per run (H2D + compute + D2H, like trtexec's
    latency), with the GPU compute time of each run in `gpu_ms`. No torch import."""

    name = "tensorrt"

    def __init__(self, model: Any, options: RunnerOptions) -> None:
        from compressor.deploy.tensorrt_runtime import TrtEngine

        require_tensorrt()  # a missing runtime or GPU is the first thing to report (exit 3)
        path = _model_path(model)
        if path.suffix not in ENGINE_SUFFIXES:
            raise UsageError(f"backend tensorrt runs serialized engines (.engine, .plan), not {path.name!r}; build one "
                             "with `compressor export MODEL --format tensorrt`, or use --backend ort-trt for .onnx.")
        self.engine = TrtEngine(path)
        self.input_shape = options.input_shape
        self.gpu_ms = self.engine.gpu_ms

    def prepare(self, batch_size: int) -> None:
        sample = self.input_shape or tuple(self.engine.input_shape()[1:])
        if any(int(d) <= 0 for d in sample):
            raise UsageError("the engine's input has dynamic dims besides the batch; give --input-shape C,H,W.")
        self.engine.prepare(random_input([batch_size, *sample]))

    def run_once(self) -> None:
        self.engine.run()

    def close(self) -> None:
        self.engine.close()


@BACKENDS.register("torch")
class TorchRunner(Runner):
    """Eager PyTorch on the CPU under inference_mode, with `threads` intra-op threads while it lives.

    A given nn.Module is put in eval mode while benchmarked and back in its former mode on close().
    """

    name = "torch"

    def __init__(self, model: Any, options: RunnerOptions) -> None:
        import torch

        self.module = _load_torch_model(model, options)
        self.was_training = self.module.training
        self.module.eval()
        self.input_shape = list(options.input_shape)
        self.previous_threads = torch.get_num_threads()
        if options.threads:
            torch.set_num_threads(options.threads)
        self.example = None

    def prepare(self, batch_size: int) -> None:
        import torch

        self.example = torch.from_numpy(random_input([batch_size, *self.input_shape]))

    def run_once(self) -> None:
        import torch

        with torch.inference_mode():
            self.module(self.example)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.previous_threads)
        self.module.train(self.was_training)


def _load_torch_model(model: Any, options: RunnerOptions):
    """An nn.Module as given, or loaded from a checkpoint or slim folder via compressor.models.loading."""
    from torch import nn

    given = isinstance(model, nn.Module)
    if not given and _model_path(model).suffix in ONNX_SUFFIXES + ENGINE_SUFFIXES:
        raise UsageError("the torch backend runs PyTorch models (.pt, slim folder); give an .onnx to an ort-* backend.")
    input_shape = options.input_shape
    if input_shape is None:
        raise UsageError("the torch backend needs the input shape of one sample: --input-shape C,H,W.")
    if given:
        return model
    if len(input_shape) != 3:
        raise UsageError(f"--input-shape must be C,H,W for the torch backend, not {','.join(map(str, input_shape))}.")
    from compressor.models.loading import load_model
    from compressor.models.config import ModelConfig

    return load_model(model, ModelConfig(arch=None, input_shape=list(input_shape), in_channels=input_shape[0]),
                      trust_checkpoint=options.trust_checkpoint)


def check_backend(backend: str) -> None:
    """Fail now (BackendUnavailable, exit 3) when `backend` cannot run on this machine, before any long work."""
    BACKENDS.get(backend)
    if backend.startswith("ort-"):
        require_provider(backend)
    elif backend == "tensorrt":
        require_tensorrt()


def make_runner(backend: str, model: Any, threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                *, trust_checkpoint: bool = False, fp16: bool = False, cache_dir: Optional[Path] = None) -> Runner:
    """A runner for `model` (a path, or an nn.Module for the torch backend) on `backend`."""
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    return BACKENDS.get(backend)(model, RunnerOptions(threads, shape, trust_checkpoint, fp16, cache_dir))


def gpu_compute(runner: Runner, runs: int, batch: int) -> Optional[dict[str, Any]]:
    """GPU compute time statistics of the last `runs` runs, for runners that time the GPU (tensorrt)."""
    gpu_ms = getattr(runner, "gpu_ms", None)
    if not gpu_ms:
        return None
    return measurement([t / 1e3 for t in gpu_ms[-runs:]], batch)["latency"]


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class LatencyStats:
    """Latency in milliseconds per run, and samples per second."""

    count: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    throughput: float


def summarize(times_s: list[float], batch: int) -> LatencyStats:
    """Statistics of per-run times (seconds); percentiles interpolate linearly, std is the population one."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return LatencyStats(count=len(ms), mean=float(ms.mean()), std=float(ms.std()), min=float(ms.min()),
                        p50=float(p50), p90=float(p90), p95=float(p95), p99=float(p99), max=float(ms.max()),
                        throughput=batch / (float(ms.mean()) / 1e3))


def measurement(times_s: list[float], batch: int) -> dict[str, Any]:
    """One model's entry in the report: latency statistics with raw values, and throughput."""
    stats = asdict(summarize(times_s, batch))
    throughput = stats.pop("throughput")
    latency = {**stats, "unit": "ms", "values": [t * 1e3 for t in times_s]}
    return {"latency": latency, "throughput": {"value": throughput, "unit": "samples/s"}}


# ---------------------------------------------------------------------------------------------- timing
def _timed(runner: Runner) -> float:
    start = time.perf_counter()
    runner.run_once()
    return time.perf_counter() - start


def _warm_up(runner: Runner, warmup_ms: float) -> None:
    """Run until `warmup_ms` have passed, at least once."""
    end = time.perf_counter() + warmup_ms / 1e3
    runner.run_once()
    while time.perf_counter() < end:
        runner.run_once()


def measure(runner: Runner, batch: int, warmup_ms: float, min_runs: int, min_seconds: float) -> list[float]:
    """Per-run seconds after a timed warm-up: at least `min_runs` runs (and one) and `min_seconds` in all."""
    runner.prepare(batch)
    _warm_up(runner, warmup_ms)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(min_runs, 1) or time.perf_counter() - start < min_seconds:
        times.append(_timed(runner))
    return times


def measure_interleaved(runner_a: Runner, runner_b: Runner, batch: int, warmup_ms: float, min_runs: int,
                        min_seconds: float) -> tuple[list[float], list[float]]:
    """Per-run seconds of A and B timed alternately (A B A B ...) so machine noise hits both alike."""
    times_a, times_b = measure_round_robin([runner_a, runner_b], batch, warmup_ms, min_runs, min_seconds)
    return times_a, times_b


def measure_round_robin(runners: Sequence[Runner], batch: int, warmup_ms: float, min_runs: int,
                        min_seconds: float) -> list[list[float]]:
    """Per-run seconds of every runner, timed in turn (A B C A B C ...), at least `min_runs` runs each and
    `min_seconds` per runner in all."""
    for runner in runners:
        runner.prepare(batch)
        _warm_up(runner, warmup_ms)
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    while len(times[0]) < max(min_runs, 1) or time.perf_counter() - start < len(runners) * min_seconds:
        for runner, own in zip(runners, times):
            own.append(_timed(runner))
    return times


# ---------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    with contextlib.suppress(OSError):  # no /proc on macOS: fall back to platform
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> Optional[str]:
    """An installed package's version without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(threads: Optional[int] = None) -> dict[str, Any]:
    """The machine and library versions a latency number depends on (torch is never imported for this)."""
    try:
        import onnxruntime
        ort_version, providers = onnxruntime.__version__, onnxruntime.get_available_providers()
    except ImportError:
        ort_version, providers = None, []
    torch = sys.modules.get("torch")
    gpus = nvidia_gpus() or None
    return {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "system": platform.system(),
        "platform": platform.platform(), "python_version": platform.python_version(),
        "gpu": [g["name"] for g in gpus] if gpus else None, "gpu_count": len(gpus) if gpus else 0,
        "nvidia_driver": gpus[0]["driver"] if gpus else None,
        "onnxruntime_version": ort_version, "onnxruntime_providers": providers, "numpy_version": np.__version__,
        "torch_version": torch.__version__ if torch is not None else _version("torch"),
        "tensorrt_version": _version("tensorrt"), "threads": threads,
    }


# ---------------------------------------------------------------------------------------------- sweep
def default_backend(model: str | Path) -> str:
    """ort-cpu for .onnx, tensorrt for .engine/.plan, torch for PyTorch checkpoints and slim folders."""
    suffix = Path(model).suffix
    return "ort-cpu" if suffix in ONNX_SUFFIXES else "tensorrt" if suffix in ENGINE_SUFFIXES else "torch"


def parse_ints(text: str, option: str) -> list[int]:
    """'1,8' -> [1, 8] (positive integers), or UsageError naming the option."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{option} takes positive integers separated by commas (e.g. 1,8), not {text!r}.")
    return values


def _check_settings(backends: list[str], batch_sizes: list[int], warmup_ms: float, min_runs: int,
                    min_seconds: float) -> None:
    if not backends or not batch_sizes:
        raise UsageError("bench needs at least one backend and one batch size.")
    if any(b <= 0 for b in batch_sizes) or min_runs < 1 or warmup_ms < 0 or min_seconds < 0:
        raise UsageError("batch sizes and --min-runs must be positive; --warmup-ms and --min-seconds not negative.")
    for backend in backends:
        BACKENDS.get(backend)  # an unknown name fails before anything is timed


def _bench_backend(backend: str, model: Any, baseline: Any, settings: dict[str, Any], tracker: Tracker) -> list[dict]:
    """Results of one backend over the batch sizes; the baseline (if any) timed interleaved with the model."""
    timing = {k: settings[k] for k in ("warmup_ms", "min_runs", "min_seconds")}
    runners: list[Runner] = []
    results = []
    try:
        for artifact in (model, baseline) if baseline is not None else (model,):
            runners.append(make_runner(backend, artifact, settings["threads"], settings["input_shape"],
                                       trust_checkpoint=settings["trust_checkpoint"], fp16=settings["fp16"],
                                       cache_dir=settings["cache_dir"]))
        for batch in settings["batch_sizes"]:
            result: dict[str, Any] = {"backend": backend, "batch_size": batch}
            if len(runners) == 1:
                times_model = measure(runners[0], batch, **timing)
                result["model"] = measurement(times_model, batch)
            else:  # the baseline is A, the model B: A B A B ...
                times_base, times_model = measure_interleaved(runners[1], runners[0], batch, **timing)
                result["model"] = measurement(times_model, batch)
                result["baseline"] = measurement(times_base, batch)
                result["speedup"] = float(np.median(times_base) / np.median(times_model))
                if gpu_compute(runners[1], len(times_base), batch):
                    result["baseline"]["gpu_compute"] = gpu_compute(runners[1], len(times_base), batch)
            if gpu_compute(runners[0], len(times_model), batch):
                result["model"]["gpu_compute"] = gpu_compute(runners[0], len(times_model), batch)
            results.append(result)
            tracker.advance()
    finally:
        for runner in reversed(runners):  # reverse order: each restores what the one before it saw
            runner.close()
    return results


def run_benchmark(model_path: str | Path, *, baseline: str | Path | None = None, backends: list[str],
                  batch_sizes: list[int], warmup_ms: float, min_runs: int, min_seconds: float, threads: Optional[int],
                  input_shape: Optional[list[int]] = None, trust_checkpoint: bool = False, fp16: bool = False,
                  cache_dir: Optional[Path] = None) -> dict[str, Any]:
    """Latency of a model (and of its baseline, interleaved) per backend and batch size, as a JSON-able report."""
    _check_settings(backends, batch_sizes, warmup_ms, min_runs, min_seconds)
    settings = {"model": str(model_path), "baseline": None if baseline is None else str(baseline),
                "backends": list(backends), "batch_sizes": list(batch_sizes), "warmup_ms": warmup_ms,
                "min_runs": min_runs, "min_seconds": min_seconds, "threads": threads,
                "input_shape": None if input_shape is None else list(input_shape), "seed": SEED,
                "interleaved": baseline is not None, "trust_checkpoint": trust_checkpoint, "fp16": fp16,
                "cache_dir": None if cache_dir is None else str(cache_dir)}
    results: list[dict] = []
    with track("benchmark", total=len(backends) * len(batch_sizes)) as tracker:
        for backend in backends:
            results += _bench_backend(backend, model_path, baseline, settings, tracker)
    return {"environment": environment(threads), "config": settings, "results": results}


def render_report(report: dict[str, Any], console: "Console") -> None:
    """The report's results as a table: percentiles, mean±std, throughput and, with a baseline, the speedup."""
    from rich.table import Table

    has_baseline = report["config"]["baseline"] is not None
    columns = ["backend", "batch", "p50 ms", "p90 ms", "p99 ms", "mean±std ms", "samples/s"]
    table = Table(*columns, *(["baseline p50 ms", "speedup"] if has_baseline else []))
    for r in report["results"]:
        lat = r["model"]["latency"]
        row = [r["backend"], str(r["batch_size"]), f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
               f"{lat['mean']:.3f}±{lat['std']:.3f}", f"{r['model']['throughput']['value']:.1f}"]
        if has_baseline:
            row += [f"{r['baseline']['latency']['p50']:.3f}", f"{r['speedup']:.2f}x"]
        table.add_row(*row)
    console.print(table)
