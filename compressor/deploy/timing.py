"""How every latency number is taken: runners built for a backend, each warmed up, timed in turn (A B C A B C ...)
until a run count and a duration are both reached, closed in reverse order, and reduced to statistics.

Its callers only choose what to time and what to report: `compressor bench` (deploy/bench.py), compress's final
bench (app/pipeline.py), `round_to: auto` (prune/round_to.py), the latency target's measure-prune loop
(prune/latency_target.py) and latency tables (deploy/latency_table.py). No torch import here (the torch backend
imports it when built): timing an .onnx or an engine works with only numpy and its runtime installed.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

import compressor.deploy.backends  # noqa: F401  (registers every backend in BACKENDS)
from compressor.deploy.runners import BACKENDS, Runner, RunnerOptions


@dataclass(frozen=True)
class Budget:
    """How long each runner is timed: a warm-up of `warmup_ms` (at least one run), then at least `min_runs` runs
    (and one) and `min_seconds` per runner."""

    warmup_ms: float
    min_runs: int
    min_seconds: float


# ---------------------------------------------------------------------------------------------- runners
def make_runner(backend: str, model: Any, threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                *, trust_checkpoint: bool = False, fp16: bool = False, cache_dir: Optional[Any] = None,
                interleaved: bool = False, inputs: Optional[Any] = None) -> Runner:
    """A runner for `model` (a path, or an nn.Module for the torch backend) on `backend`. `interleaved`: it will be
    timed in turn with other runners, so its idle threads must not spin (see onnx_runtime.create_session).
    `inputs`: a pool of samples (P, *sample shape) every batch is drawn from (runners.bench_input) instead of the
    seeded random input, e.g. real validation images for a detector whose NMS cost depends on the content."""
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    return BACKENDS.get(backend)(model, RunnerOptions(threads, shape, trust_checkpoint, fp16, cache_dir,
                                                      spinning=not interleaved, inputs=inputs))


def close_all(runners: Sequence[Runner]) -> None:
    """Close runners in reverse order of creation: each restores what the one before it saw (torch's thread count)."""
    for runner in reversed(runners):
        runner.close()


@contextlib.contextmanager
def opened(backend: str, artifacts: Sequence[Any], *, threads: Optional[int] = None,
           input_shape: Optional[Sequence[int]] = None, input_shapes: Optional[Sequence[Optional[Sequence[int]]]] = None,
           interleaved: Optional[bool] = None, **options: Any) -> Iterator[list[Runner]]:
    """Runners for `artifacts` on `backend`, closed on exit (also those built before one failed to build).
    `input_shapes`: one sample shape per artifact instead of the common `input_shape`; `interleaved` defaults to
    whether more than one runner is timed."""
    shapes = list(input_shapes) if input_shapes is not None else [input_shape] * len(artifacts)
    if len(shapes) != len(artifacts):
        raise ValueError(f"{len(shapes)} input shapes for {len(artifacts)} artifacts")
    turn = len(artifacts) > 1 if interleaved is None else interleaved
    runners: list[Runner] = []
    try:
        for artifact, shape in zip(artifacts, shapes):
            runners.append(make_runner(backend, artifact, threads, shape, interleaved=turn, **options))
        yield runners
    finally:
        close_all(runners)


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
    """One model's entry in a bench report: latency statistics with raw values, and throughput."""
    stats = asdict(summarize(times_s, batch))
    throughput = stats.pop("throughput")
    latency = {**stats, "unit": "ms", "values": [t * 1e3 for t in times_s]}
    return {"latency": latency, "throughput": {"value": throughput, "unit": "samples/s"}}


# ---------------------------------------------------------------------------------------------- timing loops
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


def measure_round_robin(runners: Sequence[Runner], batch: int, warmup_ms: float, min_runs: int,
                        min_seconds: float) -> list[list[float]]:
    """Per-run seconds of every runner, timed in turn (A B C A B C ...) after each one's warm-up, at least
    `min_runs` runs each and `min_seconds` per runner in all."""
    for runner in runners:
        runner.prepare(batch)
        _warm_up(runner, warmup_ms)
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    while len(times[0]) < max(min_runs, 1) or time.perf_counter() - start < len(runners) * min_seconds:
        for runner, own in zip(runners, times):
            own.append(_timed(runner))
    return times


def measure(runner: Runner, batch: int, warmup_ms: float, min_runs: int, min_seconds: float) -> list[float]:
    """Per-run seconds of one runner after a timed warm-up: at least `min_runs` runs (and one) and `min_seconds`."""
    return measure_round_robin([runner], batch, warmup_ms, min_runs, min_seconds)[0]


def measure_interleaved(runner_a: Runner, runner_b: Runner, batch: int, warmup_ms: float, min_runs: int,
                        min_seconds: float) -> tuple[list[float], list[float]]:
    """Per-run seconds of A and B timed alternately (A B A B ...) so machine noise hits both alike."""
    times_a, times_b = measure_round_robin([runner_a, runner_b], batch, warmup_ms, min_runs, min_seconds)
    return times_a, times_b


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Timed:
    """Runners timed in turn at one batch size: per-run seconds of each (in the runners' order) and, for runners
    that time the GPU (tensorrt), the GPU compute milliseconds of the same runs."""

    batch: int
    times: list[list[float]]
    gpu_ms: list[Optional[list[float]]] = field(default_factory=list)

    @property
    def stats(self) -> list[LatencyStats]:
        return [summarize(t, self.batch) for t in self.times]

    @property
    def p50_ms(self) -> list[float]:
        """Each runner's median latency in milliseconds."""
        return [s.p50 for s in self.stats]

    def ms(self, index: int) -> list[float]:
        """Runner `index`'s per-run milliseconds."""
        return [t * 1e3 for t in self.times[index]]

    def speedup(self, index: int, baseline: int = 0) -> float:
        """Median latency of runner `baseline` over that of runner `index`."""
        p50 = self.p50_ms
        return p50[baseline] / p50[index]

    def measurement(self, index: int) -> dict[str, Any]:
        """Runner `index`'s bench-report entry (see measurement), with its GPU compute statistics when it has them."""
        entry = measurement(self.times[index], self.batch)
        gpu = self.gpu_ms[index] if index < len(self.gpu_ms) else None
        if gpu:
            entry["gpu_compute"] = measurement([t / 1e3 for t in gpu], self.batch)["latency"]
        return entry


def time_in_turn(runners: Sequence[Runner], batch: int, budget: Budget) -> Timed:
    """`runners` timed in turn at `batch` within `budget` (measure_round_robin)."""
    times = measure_round_robin(list(runners), batch, budget.warmup_ms, budget.min_runs, budget.min_seconds)
    gpu = [list(getattr(r, "gpu_ms", None) or [])[-len(t):] or None for r, t in zip(runners, times)]
    return Timed(batch, times, gpu)


def time_models(backend: str, artifacts: Sequence[Any], batches: Sequence[int], budget: Budget, *,
                each: Optional[Callable[[Timed], Any]] = None, **runner_options: Any) -> list[Timed]:
    """`artifacts` on `backend` timed in turn at every batch size (the runners built once, see `opened` for
    `runner_options`); `each` is called with every batch's result as soon as it is measured."""
    results = []
    with opened(backend, artifacts, **runner_options) as runners:
        for batch in batches:
            results.append(time_in_turn(runners, batch, budget))
            if each is not None:
                each(results[-1])
    return results
