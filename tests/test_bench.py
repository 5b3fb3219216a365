"""Latency benchmarks (compressor.deploy.bench and `compressor bench`): statistics, timing loops, backends, report."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from compressor.deploy import bench, runners
from compressor.errors import UsageError

from .conftest import REPO, run_cli

STEP = 1 / 64  # one fake run; a power of two keeps the fake clock's sums exact
FAST = ("--min-runs", "3", "--min-seconds", "0", "--warmup-ms", "0")


def tiny_net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 4)).eval()


def export(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A small compressed-looking model and a wider 'dense' baseline, both with a dynamic batch axis."""
    folder = tmp_path_factory.mktemp("bench")
    return export(tiny_net(4), folder / "tiny.onnx"), export(tiny_net(16), folder / "tiny2.onnx")


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory) -> Path:
    """GlobalAveragePool over an input whose batch, height and width are all symbolic."""
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("dyn") / "dynamic.onnx"
    onnx.save(model, str(path))
    return path


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRunner(runners.Runner):
    """Each run advances the fake clock by STEP and appends its name to a shared log."""

    def __init__(self, name: str, clock: FakeClock, log: list[str]) -> None:
        self.name, self.clock, self.log, self.batches = name, clock, log, []

    def prepare(self, batch_size: int) -> None:
        self.batches.append(batch_size)

    def run_once(self) -> None:
        self.clock.now += STEP
        self.log.append(self.name)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", fake)
    return fake


# ---------------------------------------------------------------------------------------------- statistics
def test_summarize_known_times():
    stats = bench.summarize([0.001, 0.002, 0.003, 0.004], batch=4)
    assert stats.count == 4
    assert stats.mean == pytest.approx(2.5) and stats.p50 == pytest.approx(2.5)
    assert stats.min == pytest.approx(1.0) and stats.max == pytest.approx(4.0)
    assert (stats.p90, stats.p95, stats.p99) == pytest.approx((3.7, 3.85, 3.97))
    assert stats.std == pytest.approx(np.sqrt(1.25))
    assert stats.throughput == pytest.approx(4 / 0.0025)


def test_measurement_layout_is_in_milliseconds():
    entry = bench.measurement([0.002, 0.004], batch=2)
    assert entry["latency"]["unit"] == "ms" and entry["latency"]["values"] == pytest.approx([2.0, 4.0])
    assert entry["latency"]["p50"] == pytest.approx(3.0) and entry["latency"]["count"] == 2
    assert entry["throughput"] == {"value": pytest.approx(2 / 0.003), "unit": "samples/s"}
    assert "throughput" not in entry["latency"]


# ---------------------------------------------------------------------------------------------- timing loops
def test_measure_stops_at_min_runs_when_min_seconds_is_reached(clock):
    log: list[str] = []
    runner = FakeRunner("A", clock, log)
    times = bench.measure(runner, batch=8, warmup_ms=0, min_runs=7, min_seconds=0)
    assert times == [STEP] * 7
    assert len(log) == 8  # one warm-up run even with warmup_ms=0
    assert runner.batches == [8]


def test_measure_runs_until_min_seconds(clock):
    runner = FakeRunner("A", clock, [])
    times = bench.measure(runner, batch=1, warmup_ms=0, min_runs=2, min_seconds=6 * STEP)
    assert times == [STEP] * 6


def test_measure_warms_up_by_time(clock):
    log: list[str] = []
    bench.measure(FakeRunner("A", clock, log), batch=1, warmup_ms=2.5 * STEP * 1e3, min_runs=1, min_seconds=0)
    assert len(log) == 3 + 1  # warm-up until 2.5 steps have passed (3 runs), then one timed run


def test_measure_interleaved_alternates_strictly(clock):
    log: list[str] = []
    a, b = FakeRunner("A", clock, log), FakeRunner("B", clock, log)
    times_a, times_b = bench.measure_interleaved(a, b, batch=2, warmup_ms=0, min_runs=3, min_seconds=0)
    assert log == ["A", "B"] + ["A", "B"] * 3
    assert times_a == [STEP] * 3 and times_b == [STEP] * 3
    assert a.batches == [2] and b.batches == [2]


def test_measure_interleaved_takes_twice_min_seconds(clock):
    log: list[str] = []
    times_a, times_b = bench.measure_interleaved(FakeRunner("A", clock, log), FakeRunner("B", clock, log), batch=1,
                                                 warmup_ms=0, min_runs=1, min_seconds=4 * STEP)
    assert len(times_a) == len(times_b) == 4  # 8 steps in all = 2 * min_seconds
    assert log[2:] == ["A", "B"] * 4


# ---------------------------------------------------------------------------------------------- runners
def test_ort_runner_fills_the_dynamic_batch(onnx_pair):
    runner = bench.make_runner("ort-cpu", onnx_pair[0], threads=1)
    runner.prepare(3)
    (feed,) = runner.feed.values()
    assert feed.shape == (3, 3, 8, 8) and feed.dtype == np.float32
    assert np.array_equal(feed, runners.random_input((3, 3, 8, 8)))  # seeded: the baseline gets the same data
    runner.run_once()
    runner.close()


def test_dynamic_sample_dims_need_input_shape(dynamic_onnx):
    runner = bench.make_runner("ort-cpu", dynamic_onnx)
    with pytest.raises(UsageError, match="--input-shape"):
        runner.prepare(2)
    shaped = bench.make_runner("ort-cpu", dynamic_onnx, input_shape=[3, 5, 6])
    shaped.prepare(2)
    assert next(iter(shaped.feed.values())).shape == (2, 3, 5, 6)
    shaped.run_once()
    with pytest.raises(UsageError, match="does not fit"):
        bench.make_runner("ort-cpu", dynamic_onnx, input_shape=[4, 5, 6]).prepare(1)


def test_torch_runner_restores_threads_and_mode():
    model = tiny_net(4).train()
    threads = torch.get_num_threads()
    runner = bench.make_runner("torch", model, threads=1, input_shape=[3, 8, 8])
    assert torch.get_num_threads() == 1 and not model.training
    times = bench.measure(runner, batch=2, warmup_ms=0, min_runs=2, min_seconds=0)
    runner.close()
    assert len(times) == 2 and all(t > 0 for t in times)
    assert torch.get_num_threads() == threads and model.training


def test_torch_runner_needs_input_shape():
    with pytest.raises(UsageError, match="--input-shape C,H,W"):
        bench.make_runner("torch", tiny_net(4))


def test_parse_ints():
    assert bench.parse_ints("1, 8,", "--batch") == [1, 8]
    with pytest.raises(UsageError, match="--batch"):
        bench.parse_ints("0,8", "--batch")
    with pytest.raises(UsageError, match="--input-shape"):
        bench.parse_ints("3,x", "--input-shape")


def test_environment_reports_machine_and_versions():
    env = bench.environment(threads=2)
    assert env["cpu_count"] == os.cpu_count() and env["threads"] == 2 and env["cpu"]
    assert env["onnxruntime_version"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert env["torch_version"] == torch.__version__ and env["numpy_version"] == np.__version__
    if shutil.which("nvidia-smi") is None:
        assert env["gpu"] is None and env["gpu_count"] == 0 and env["nvidia_driver"] is None


def test_gpu_and_driver_come_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 550.54.15'\necho 'NVIDIA H100 80GB HBM3, 550.54.15'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = bench.environment()
    assert env["gpu"] == ["NVIDIA H100 80GB HBM3"] * 2 and env["gpu_count"] == 2
    assert env["nvidia_driver"] == "550.54.15"


# ---------------------------------------------------------------------------------------------- library and CLI
def test_onnx_benchmark_does_not_import_torch(onnx_pair):
    code = ("import sys; from compressor.deploy.bench import run_benchmark; "
            f"r = run_benchmark({str(onnx_pair[0])!r}, baseline=None, backends=['ort-cpu'], batch_sizes=[1], "
            "warmup_ms=0, min_runs=2, min_seconds=0, threads=1); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r['results'][0]['model']['latency']['count'])")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


def test_cli_bench_with_baseline_writes_json(onnx_pair, tmp_path):
    model, baseline = onnx_pair
    out = tmp_path / "out.json"
    result = run_cli("bench", model, "--baseline", baseline, "--backend", "ort-cpu", "--batch", "1,2", *FAST,
                     "--threads", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "ort-cpu" in result.stdout
    report = json.loads(out.read_text())
    assert [(r["backend"], r["batch_size"]) for r in report["results"]] == [("ort-cpu", 1), ("ort-cpu", 2)]
    for r in report["results"]:
        for key in ("model", "baseline"):
            latency = r[key]["latency"]
            assert latency["count"] == 3 and len(latency["values"]) == 3 and latency["unit"] == "ms"
            assert 0 < latency["min"] <= latency["p50"] <= latency["max"]
            assert r[key]["throughput"]["value"] == pytest.approx(r["batch_size"] / latency["mean"] * 1e3)
        assert r["speedup"] == pytest.approx(r["baseline"]["latency"]["p50"] / r["model"]["latency"]["p50"])
    assert report["config"]["baseline"] == str(baseline) and report["config"]["interleaved"] is True
    assert report["environment"]["threads"] == 1 and report["environment"]["cpu_count"] == os.cpu_count()


def test_cli_default_backend_for_onnx_is_ort_cpu(onnx_pair, tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench", onnx_pair[0], "--batch", "2", *FAST, "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(r["backend"], r["batch_size"]) for r in report["results"]] == [("ort-cpu", 2)]
    assert "baseline" not in report["results"][0] and "speedup" not in report["results"][0]


UNAVAILABLE = {
    "ort-cuda": ("CUDAExecutionProvider", "CUDAExecutionProvider" in onnxruntime.get_available_providers()),
    "ort-trt": ("TensorrtExecutionProvider", "TensorrtExecutionProvider" in onnxruntime.get_available_providers()),
    "tensorrt": ("tensorrt Python package", shutil.which("nvidia-smi") is not None),
}


@pytest.mark.parametrize("backend", sorted(UNAVAILABLE))
def test_cli_missing_backend_exits_3(onnx_pair, backend):
    missing, present = UNAVAILABLE[backend]
    if present:
        pytest.skip(f"{missing} is present on this machine")
    result = run_cli("bench", onnx_pair[0], "--backend", backend, *FAST)
    assert result.returncode == 3, result.stderr
    assert missing in result.stderr and f"backend {backend}" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_backend_exits_2_with_suggestion(onnx_pair):
    result = run_cli("bench", onnx_pair[0], "--backend", "ort-cpux", *FAST)
    assert result.returncode == 2
    assert "did you mean ort-cpu?" in result.stderr


def test_cli_missing_model_exits_2(tmp_path):
    missing = tmp_path / "absent.onnx"
    result = run_cli("bench", missing, *FAST)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr


def test_cli_torch_backend_on_onnx_exits_2(onnx_pair):
    result = run_cli("bench", onnx_pair[0], "--backend", "torch", "--input-shape", "3,8,8", *FAST)
    assert result.returncode == 2
    assert "the torch backend runs PyTorch models" in result.stderr


def _spinning(runner) -> str:
    try:
        return runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:  # noqa: BLE001 - onnxruntime raises for a key never set: its default, spinning on
        return "default"


def test_runners_timed_in_turn_do_not_spin(onnx_pair, monkeypatch):
    """An idle session's spinning threads take the cores from the one being timed; runners made for interleaved
    timing (the baseline bench, compress, round_to, latency targets, latency tables) turn spinning off."""
    model, baseline = onnx_pair
    assert _spinning(bench.make_runner("ort-cpu", model)) == "default"  # one model alone: onnxruntime's default
    assert _spinning(bench.make_runner("ort-cpu", model, interleaved=True)) == "0"
    seen = []
    real = bench.make_runner

    def recording(*args, **kwargs):
        runner = real(*args, **kwargs)
        seen.append(_spinning(runner))
        return runner

    monkeypatch.setattr(bench, "make_runner", recording)
    for other in (baseline, None):
        bench.run_benchmark(model, baseline=other, backends=["ort-cpu"], batch_sizes=[1], warmup_ms=0, min_runs=2,
                            min_seconds=0, threads=1)
    assert seen == ["0", "0", "default"]  # model and baseline in turn, then the model alone
