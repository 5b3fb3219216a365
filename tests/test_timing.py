"""compressor.deploy.timing: the one timing orchestration behind `compressor bench`, compress's final bench,
round_to: auto, latency targets and latency tables (runners built, timed in turn, closed, reduced to medians)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor.deploy import runners, timing

STEP = 1 / 64  # a power of two keeps the fake clock's sums exact


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostRunner(runners.Runner):
    """Each run advances the fake clock by `cost` steps; records its batches, runs and closing in a shared log."""

    def __init__(self, name: str, cost: int, clock: Clock, log: list[str], gpu: bool = False) -> None:
        self.name, self.cost, self.clock, self.log, self.batches = name, cost, clock, log, []
        if gpu:
            self.gpu_ms: list[float] = []

    def prepare(self, batch_size: int) -> None:
        self.batches.append(batch_size)

    def run_once(self) -> None:
        self.clock.now += self.cost * STEP
        self.log.append(self.name)
        if hasattr(self, "gpu_ms"):
            self.gpu_ms.append(float(len(self.gpu_ms)))  # run i took i ms on the GPU: which runs are kept shows

    def close(self) -> None:
        self.log.append(f"close {self.name}")


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def fake_factory(monkeypatch, clock: Clock, log: list[str], costs: dict[str, int], built: list[tuple]):
    """make_runner replaced by CostRunners (name = the artifact); 'bad' fails to build."""

    def make(backend, artifact, threads=None, input_shape=None, *, interleaved=False, **options):
        built.append((artifact, input_shape, interleaved))
        if artifact == "bad":
            raise ValueError("cannot build bad")
        return CostRunner(artifact, costs.get(artifact, 1), clock, log, gpu=artifact.startswith("gpu"))

    monkeypatch.setattr(timing, "make_runner", make)


# ---------------------------------------------------------------------------------------------- statistics
def test_summarize_known_times():
    stats = timing.summarize([0.001, 0.002, 0.003, 0.004], batch=4)
    assert stats.count == 4
    assert stats.mean == pytest.approx(2.5) and stats.p50 == pytest.approx(2.5)
    assert stats.min == pytest.approx(1.0) and stats.max == pytest.approx(4.0)
    assert (stats.p90, stats.p95, stats.p99) == pytest.approx((3.7, 3.85, 3.97))
    assert stats.std == pytest.approx(np.sqrt(1.25))
    assert stats.throughput == pytest.approx(4 / 0.0025)


def test_measurement_layout_is_in_milliseconds():
    entry = timing.measurement([0.002, 0.004], batch=2)
    assert entry["latency"]["unit"] == "ms" and entry["latency"]["values"] == pytest.approx([2.0, 4.0])
    assert entry["latency"]["p50"] == pytest.approx(3.0) and entry["latency"]["count"] == 2
    assert entry["throughput"] == {"value": pytest.approx(2 / 0.003), "unit": "samples/s"}
    assert "throughput" not in entry["latency"]


# ---------------------------------------------------------------------------------------------- timing loops
def test_measure_stops_at_min_runs_when_min_seconds_is_reached(clock):
    log: list[str] = []
    runner = CostRunner("A", 1, clock, log)
    times = timing.measure(runner, batch=8, warmup_ms=0, min_runs=7, min_seconds=0)
    assert times == [STEP] * 7
    assert len(log) == 8  # one warm-up run even with warmup_ms=0
    assert runner.batches == [8]


def test_measure_runs_until_min_seconds(clock):
    runner = CostRunner("A", 1, clock, [])
    times = timing.measure(runner, batch=1, warmup_ms=0, min_runs=2, min_seconds=6 * STEP)
    assert times == [STEP] * 6


def test_measure_warms_up_by_time(clock):
    log: list[str] = []
    timing.measure(CostRunner("A", 1, clock, log), batch=1, warmup_ms=2.5 * STEP * 1e3, min_runs=1, min_seconds=0)
    assert len(log) == 3 + 1  # warm-up until 2.5 steps have passed (3 runs), then one timed run


def test_measure_interleaved_alternates_strictly(clock):
    log: list[str] = []
    a, b = CostRunner("A", 1, clock, log), CostRunner("B", 1, clock, log)
    times_a, times_b = timing.measure_interleaved(a, b, batch=2, warmup_ms=0, min_runs=3, min_seconds=0)
    assert log == ["A", "B"] + ["A", "B"] * 3
    assert times_a == [STEP] * 3 and times_b == [STEP] * 3
    assert a.batches == [2] and b.batches == [2]


def test_measure_interleaved_takes_twice_min_seconds(clock):
    log: list[str] = []
    times_a, times_b = timing.measure_interleaved(CostRunner("A", 1, clock, log), CostRunner("B", 1, clock, log), batch=1,
                                                 warmup_ms=0, min_runs=1, min_seconds=4 * STEP)
    assert len(times_a) == len(times_b) == 4  # 8 steps in all = 2 * min_seconds
    assert log[2:] == ["A", "B"] * 4


# ---------------------------------------------------------------------------------------------- orchestration
def test_time_in_turn_reduces_to_medians_and_speedups(clock):
    log: list[str] = []
    dense, pruned, tiny = CostRunner("D", 4, clock, log), CostRunner("P", 2, clock, log), CostRunner("T", 1, clock, log)
    timed = timing.time_in_turn([dense, pruned, tiny], 8, timing.Budget(warmup_ms=0, min_runs=3, min_seconds=0))
    assert log == ["D", "P", "T"] + ["D", "P", "T"] * 3  # one warm-up run each, then in turn
    assert timed.batch == 8 and timed.times == [[4 * STEP] * 3, [2 * STEP] * 3, [STEP] * 3]
    assert timed.p50_ms == [4 * STEP * 1e3, 2 * STEP * 1e3, STEP * 1e3]
    assert timed.speedup(1) == 2.0 and timed.speedup(2) == 4.0 and timed.speedup(2, baseline=1) == 2.0
    assert timed.ms(1) == [2 * STEP * 1e3] * 3
    assert [s.count for s in timed.stats] == [3, 3, 3] and timed.stats[0].throughput == pytest.approx(8 / (4 * STEP))
    assert timed.gpu_ms == [None, None, None] and "gpu_compute" not in timed.measurement(0)


def test_gpu_compute_times_are_those_of_the_timed_runs(clock):
    log: list[str] = []
    gpu = CostRunner("gpu", 1, clock, log, gpu=True)
    timed = timing.time_in_turn([gpu], 4, timing.Budget(warmup_ms=0, min_runs=3, min_seconds=0))
    assert timed.gpu_ms == [[1.0, 2.0, 3.0]]  # run 0 was the warm-up
    entry = timed.measurement(0)
    assert entry["gpu_compute"]["values"] == [1.0, 2.0, 3.0] and entry["gpu_compute"]["p50"] == 2.0
    assert entry["latency"]["values"] == [STEP * 1e3] * 3 and entry["throughput"]["value"] == 4 / STEP


def test_time_models_builds_once_times_every_batch_and_closes_in_reverse(clock, monkeypatch):
    log: list[str] = []
    built: list[tuple] = []
    fake_factory(monkeypatch, clock, log, {"dense": 3, "model": 1}, built)
    seen = []
    results = timing.time_models("ort-cpu", ["dense", "model"], [1, 8], timing.Budget(0, 2, 0), each=seen.append,
                                 input_shape=[3, 4, 4])
    assert built == [("dense", [3, 4, 4], True), ("model", [3, 4, 4], True)]  # two runners: interleaved
    assert [t.batch for t in results] == [1, 8] and seen == results
    assert [t.speedup(1) for t in results] == [3.0, 3.0]
    assert log[-2:] == ["close model", "close dense"] and log.count("close dense") == 1


def test_opened_closes_what_it_built_when_a_later_build_fails(clock, monkeypatch):
    log: list[str] = []
    built: list[tuple] = []
    fake_factory(monkeypatch, clock, log, {}, built)
    with pytest.raises(ValueError, match="cannot build bad"):
        with timing.opened("ort-cpu", ["a", "b", "bad"]):
            pytest.fail("the body must not run")
    assert log == ["close b", "close a"]
    built.clear()
    with timing.opened("ort-cpu", ["alone"]) as (runner,):
        assert runner.name == "alone"
    assert built == [("alone", None, False)]  # one model timed alone keeps the runtime's spinning default
    with timing.opened("ort-cpu", ["p", "q"], input_shapes=[[1, 2], [3, 4]], interleaved=False):
        pass  # nothing timed: only what opened() builds is asserted
    assert built[-2:] == [("p", [1, 2], False), ("q", [3, 4], False)]
    with pytest.raises(ValueError, match="1 input shapes for 2 artifacts"):
        with timing.opened("ort-cpu", ["p", "q"], input_shapes=[[1, 2]]):
            pass  # never reached: opened() refuses the mismatched shapes on entry


def test_torch_runners_timed_together_leave_the_thread_count_as_it_was():
    """Each torch runner sets its threads and restores what it saw; closed in reverse order, the last restore is
    the caller's own count (closed in creation order, the count set by the first runner would remain)."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    nets = [nn.Sequential(nn.Conv2d(3, w, 3), nn.Flatten()) for w in (8, 4)]
    (timed,) = timing.time_models("torch", nets, [2], timing.Budget(0, 2, 0), threads=wanted, input_shape=[3, 6, 6])
    assert torch.get_num_threads() == before
    assert len(timed.times) == 2 and all(len(t) >= 2 for t in timed.times) and all(m.training for m in nets)
