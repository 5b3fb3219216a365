"""Latency benchmarks (compressor.deploy.bench and `compressor bench`): backends, environment, report (the timing
loops and statistics: test_timing.py)."""
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

from compressor.deploy import bench, runners, timing
from compressor.errors import UsageError

from .conftest import REPO, run_cli

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


# ---------------------------------------------------------------------------------------------- runners
def test_ort_runner_fills_the_dynamic_batch(onnx_pair):
    runner = timing.make_runner("ort-cpu", onnx_pair[0], threads=1)
    runner.prepare(3)
    (feed,) = runner.feed.values()
    assert feed.shape == (3, 3, 8, 8) and feed.dtype == np.float32
    assert np.array_equal(feed, runners.random_input((3, 3, 8, 8)))  # seeded: the baseline gets the same data
    runner.run_once()
    runner.close()


def test_dynamic_sample_dims_need_input_shape(dynamic_onnx):
    runner = timing.make_runner("ort-cpu", dynamic_onnx)
    with pytest.raises(UsageError, match="--input-shape"):
        runner.prepare(2)
    shaped = timing.make_runner("ort-cpu", dynamic_onnx, input_shape=[3, 5, 6])
    shaped.prepare(2)
    assert next(iter(shaped.feed.values())).shape == (2, 3, 5, 6)
    shaped.run_once()
    with pytest.raises(UsageError, match="does not fit"):
        timing.make_runner("ort-cpu", dynamic_onnx, input_shape=[4, 5, 6]).prepare(1)


def test_torch_runner_restores_threads_and_mode():
    model = tiny_net(4).train()
    threads = torch.get_num_threads()
    runner = timing.make_runner("torch", model, threads=1, input_shape=[3, 8, 8])
    assert torch.get_num_threads() == 1 and not model.training
    times = timing.measure(runner, batch=2, warmup_ms=0, min_runs=2, min_seconds=0)
    runner.close()
    assert len(times) == 2 and all(t > 0 for t in times)
    assert torch.get_num_threads() == threads and model.training


def test_torch_runner_needs_input_shape():
    with pytest.raises(UsageError, match="--input-shape C,H,W"):
        timing.make_runner("torch", tiny_net(4))


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
    assert _spinning(timing.make_runner("ort-cpu", model)) == "default"  # one model alone: onnxruntime's default
    assert _spinning(timing.make_runner("ort-cpu", model, interleaved=True)) == "0"
    seen = []
    real = timing.make_runner

    def recording(*args, **kwargs):
        runner = real(*args, **kwargs)
        seen.append(_spinning(runner))
        return runner

    monkeypatch.setattr(timing, "make_runner", recording)
    for other in (baseline, None):
        bench.run_benchmark(model, baseline=other, backends=["ort-cpu"], batch_sizes=[1], warmup_ms=0, min_runs=2,
                            min_seconds=0, threads=1)
    assert seen == ["0", "0", "default"]  # model and baseline in turn, then the model alone
