"""Latency benchmarks: statistics, interleaved A/B timing, batch sweeps, environment capture (the backends are in
compressor/deploy/backends, their contract in runners.py).

No torch import here outside the `torch` backend: benchmarking an .onnx or TensorRT file works on a device
that has only numpy and onnxruntime (or tensorrt) installed.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

import compressor.deploy.backends  # noqa: F401  (registers every backend in BACKENDS)
from compressor.deploy.runners import BACKENDS, ENGINE_SUFFIXES, ONNX_SUFFIXES, SEED, Runner, RunnerOptions
from compressor.deploy.tensorrt_runtime import nvidia_gpus
from compressor.errors import UsageError
from compressor.progress import Tracker, track

if TYPE_CHECKING:
    from rich.console import Console

def make_runner(backend: str, model: Any, threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                *, trust_checkpoint: bool = False, fp16: bool = False, cache_dir: Optional[Path] = None,
                interleaved: bool = False) -> Runner:
    """A runner for `model` (a path, or an nn.Module for the torch backend) on `backend`. `interleaved`: it will be
    timed in turn with other runners, so its idle threads must not spin (see onnx_runtime.create_session)."""
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    return BACKENDS.get(backend)(model, RunnerOptions(threads, shape, trust_checkpoint, fp16, cache_dir,
                                                      spinning=not interleaved))


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
                                       cache_dir=settings["cache_dir"], interleaved=baseline is not None))
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
