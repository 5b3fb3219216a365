"""`compressor bench`: a model (and its baseline, timed in turn) per backend and batch size as a report, and the
environment a latency number depends on. How runners are built and timed is deploy/timing.py; the backends are in
compressor/deploy/backends, their contract in runners.py.

No torch import here outside the `torch` backend: benchmarking an .onnx or TensorRT file works on a device
that has only numpy and onnxruntime (or tensorrt) installed.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from compressor.deploy.runners import BACKENDS, ENGINE_SUFFIXES, ONNX_SUFFIXES, SEED
from compressor.deploy.tensorrt_runtime import nvidia_gpus
from compressor.deploy.timing import Budget, time_models
from compressor.errors import UsageError
from compressor.progress import Tracker, track

if TYPE_CHECKING:
    from rich.console import Console

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
    """Results of one backend over the batch sizes; the baseline (if any) timed in turn with the model (A B A B ...,
    the baseline first)."""
    budget = Budget(settings["warmup_ms"], settings["min_runs"], settings["min_seconds"])
    artifacts = [model] if baseline is None else [baseline, model]
    options = {k: settings[k] for k in ("threads", "input_shape", "trust_checkpoint", "fp16", "cache_dir")}
    options["inputs"] = settings.get("pool")
    results, last = [], len(artifacts) - 1
    for timed in time_models(backend, artifacts, settings["batch_sizes"], budget, each=lambda _: tracker.advance(),
                             **options):
        result: dict[str, Any] = {"backend": backend, "batch_size": timed.batch, "model": timed.measurement(last)}
        if baseline is not None:
            result["baseline"] = timed.measurement(0)
            result["speedup"] = timed.speedup(last)
        results.append(result)
    return results


def run_benchmark(model_path: str | Path, *, baseline: str | Path | None = None, backends: list[str],
                  batch_sizes: list[int], warmup_ms: float, min_runs: int, min_seconds: float, threads: Optional[int],
                  input_shape: Optional[list[int]] = None, trust_checkpoint: bool = False, fp16: bool = False,
                  cache_dir: Optional[Path] = None, images: Optional[Path] = None) -> dict[str, Any]:
    """Latency of a model (and of its baseline, interleaved) per backend and batch size, as a JSON-able report.
    `images`: a folder whose images are the inputs (deploy/bench_images.py) instead of a seeded random tensor."""
    _check_settings(backends, batch_sizes, warmup_ms, min_runs, min_seconds)
    settings = {"model": str(model_path), "baseline": None if baseline is None else str(baseline),
                "backends": list(backends), "batch_sizes": list(batch_sizes), "warmup_ms": warmup_ms,
                "min_runs": min_runs, "min_seconds": min_seconds, "threads": threads,
                "input_shape": None if input_shape is None else list(input_shape), "seed": SEED,
                "interleaved": baseline is not None, "trust_checkpoint": trust_checkpoint, "fp16": fp16,
                "cache_dir": None if cache_dir is None else str(cache_dir), "images": None}
    if images is not None:
        from compressor.deploy.bench_images import image_pool, sample_shape

        shape = sample_shape(model_path, input_shape)
        settings["pool"] = image_pool(images, shape)
        settings["images"] = f"{len(settings['pool'])} images from {images}, resized to {shape[1]}x{shape[2]}"
    results: list[dict] = []
    with track("benchmark", total=len(backends) * len(batch_sizes)) as tracker:
        for backend in backends:
            results += _bench_backend(backend, model_path, baseline, settings, tracker)
    settings.pop("pool", None)  # the report keeps what the inputs were, not the pixels
    return {"environment": environment(threads), "config": settings, "results": results}


def is_language_model_file(model: str | Path) -> bool:
    """Whether `model` is an ONNX causal LM with a key/value cache as compressor exports one (input_ids and
    past_key_values.N.key / .value inputs; deploy/lm_session.py): `compressor bench` times its prefill and decode
    (deploy/lm_bench.py) instead of one forward. Reads the graph's inputs only (onnx, no weights, no torch)."""
    path = Path(model)
    if path.suffix not in ONNX_SUFFIXES or not path.is_file():
        return False
    import onnx

    try:
        names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    except Exception:  # not an ONNX file: the runner that opens it names the problem
        return False
    return "input_ids" in names and any(name.startswith("past_key_values.") for name in names)


def render_lm_report(report: dict[str, Any], console: "Console") -> None:
    """bench_lms's report as a table: prefill ms and decode tokens/s of each model, the speedups over the first
    (the baseline) when there are two."""
    from rich.table import Table

    cfg = report["config"]
    baseline = len(report["results"]) > 1
    console.print(f"{cfg['backend']}, batch 1: prefill of a {cfg['prompt_tokens']}-token prompt, then "
                  f"{cfg['new_tokens']} greedy tokens decoded with the key/value cache"
                  + (" (timed in turn with the baseline)" if baseline else ""))
    table = Table("model", "prefill ms", "decode tokens/s", "ms / token", *(["prefill speedup", "decode speedup"]
                                                                          if baseline else []))
    for i, r in enumerate(report["results"]):
        row = [("baseline " if baseline and i == 0 else "") + Path(r["model"]).name, f"{r['prefill_ms']:.3f}",
               f"{r['decode_tokens_per_second']:.1f}", f"{r['decode_ms_per_token']:.3f}"]
        if baseline:
            row += [f"{r['prefill_speedup']:.2f}x", f"{r['decode_speedup']:.2f}x"]
        table.add_row(*row)
    console.print(table)
    if report.get("note"):
        console.print(f"note: {report['note']}")


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
    if report["config"].get("images"):
        console.print(f"inputs: {report['config']['images']}")
