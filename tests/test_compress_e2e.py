"""`compressor compress` end to end on a Fashion-MNIST subset: the complete run and the interrupted one through the
real entry point (a separate process), the other commands in-process (invoke_cli: the same Typer app, without
starting an interpreter that imports torch for each call)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO, invoke_cli, requires_fmnist, run_cli

SAMPLE = REPO / "samples" / "resnet20-fmnist.safetensors"
QUICK = ["--set", "data.train_subset=512", "--set", "data.val_subset=512", "--set", "finetune.epochs=1",
         "--set", "verify.samples=128", "--set", "bench.min_runs=5", "--set", "bench.min_seconds=0",
         "--set", "bench.warmup_ms=20", "--set", "bench.batch_sizes=[1, 8]", "--set", "gates.max_accuracy_drop=null"]


def checkpoint() -> str:
    return str(SAMPLE) if SAMPLE.exists() else "zoo:resnet20"


@pytest.fixture(scope="module")
def oneshot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "oneshot"
    result = run_cli("compress", checkpoint(), "--recipe", "resnet20-fmnist-oneshot", "--out", out, *QUICK)
    return out, result


@requires_fmnist
def test_compress_writes_complete_verified_run(oneshot_run):
    out, result = oneshot_run
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("recipe.yaml", "model.pt", "slim.json", "weights.safetensors", "model.onnx", "dense.onnx",
                 "report.json", "report.md", "plot_widths.png", "plot_training.png", "plot_latency.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    ratio = report["compressed"]["macs"] / report["dense"]["macs"]
    assert ratio == pytest.approx(0.5, rel=0.02)  # asked: macs 0.5
    assert report["target"]["met"] is True and report["target"]["achieved_macs_ratio"] == pytest.approx(ratio)
    parity = report["parity"]["onnx"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] >= 0.999
    assert parity["samples"] == 128
    assert report["compressed"]["onnx_top1"] == pytest.approx(report["compressed"]["top1"], abs=0.4)
    rows = {(r["backend"], r["batch_size"]): r for r in report["latency"]}
    assert set(rows) == {("ort-cpu", 1), ("ort-cpu", 8), ("torch", 1), ("torch", 8)}
    for row in rows.values():
        assert row["compressed"]["count"] >= 5 and row["compressed"]["p50"] > 0
        assert row["speedup"] == pytest.approx(row["dense"]["p50"] / row["compressed"]["p50"])
        assert row["realised_ratio"] == pytest.approx(row["speedup"] * ratio)
    assert report["method"]["events"][0]["removed"] > 0
    assert report["dense"]["widths"]["layer1.0.conv1"] == 16
    assert report["compressed"]["widths"]["layer1.0.conv1"] <= 16
    layout = report["ort_cpu_layout"]  # ResNet-20 has 21 convolutions; the report says how many run in NCHWc
    assert sum(layout["dense"].values()) == sum(layout["compressed"].values()) == 21
    md = (out / "report.md").read_text()
    for heading in ("## Accuracy and size", "## Latency", "realised ratio", "## Pruning events", "## Per-layer widths",
                    f"runs {layout['compressed']['nchwc']} of 21 convolutions of the compressed model in its fast NCHWc"):
        assert heading in md
    assert "report:" in result.stdout and "MACs x0.4" in result.stdout


@requires_fmnist
def test_eval_of_the_slim_model_reproduces_the_report(oneshot_run):
    out, _ = oneshot_run
    report = json.loads((out / "report.json").read_text())
    for artifact in (out, out / "model.onnx"):
        result = invoke_cli("eval", artifact, "--recipe", "resnet20-fmnist-oneshot", "--set", "data.val_subset=512")
        assert result.returncode == 0, result.stderr
        assert f"top-1 {report['compressed']['top1']:.2f}%" in result.stdout


@requires_fmnist
def test_rerun_into_existing_dir_is_refused_then_overwritten(oneshot_run):
    out, _ = oneshot_run
    refused = invoke_cli("compress", checkpoint(), "--recipe", "resnet20-fmnist-oneshot", "--out", out, *QUICK)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr and "--resume" in refused.stderr


@requires_fmnist
def test_failed_gate_exits_1_after_writing_report(tmp_path):
    out = tmp_path / "gated"
    result = invoke_cli("compress", checkpoint(), "--recipe", "resnet20-fmnist-oneshot", "--out", out, *QUICK,
                        "--set", "gates.min_speedup=1000", "--set", "finetune.epochs=0", "--set", "bench.backends=[ort-cpu]")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "gate failed" in result.stderr and "min_speedup" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed: gates"
    assert [g["passed"] for g in report["gates"]] == [False]


@requires_fmnist
def test_parity_failure_is_an_error_not_a_warning(tmp_path):
    out = tmp_path / "parity"
    result = invoke_cli("compress", checkpoint(), "--recipe", "resnet20-fmnist-oneshot", "--out", out, *QUICK,
                        "--set", "verify.atol=1e-12", "--set", "verify.rtol=0", "--set", "finetune.epochs=0")
    assert result.returncode == 1
    assert "parity check failed" in result.stderr and "max abs diff" in result.stderr
    assert json.loads((out / "report.json").read_text())["status"] == "failed: parity"


@requires_fmnist
def test_interrupted_run_resumes_from_last_epoch(tmp_path):
    out = tmp_path / "resume"
    args = ["compress", checkpoint(), "--recipe", "resnet20-fmnist-iterative", "--out", str(out), *QUICK,
            "--set", "finetune.epochs=3", "--set", "bench.backends=[ort-cpu]", "--set", "data.train_subset=256"]
    proc = subprocess.Popen([sys.executable, "-m", "compressor", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "last.pt").exists() and not (out / "report.json").exists()
    result = invoke_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["resumed_from"] >= 1
    assert [h["epoch"] for h in report["training"]["history"]] == [1, 2, 3]
    assert len(report["method"]["events"]) == 4
    changed = invoke_cli(*args, "--resume", "--set", "finetune.seed=5")
    assert changed.returncode == 2 and "differs from the recipe" in changed.stderr


def test_missing_checkpoint_and_recipe_errors_are_clear(tmp_path):
    result = invoke_cli("compress", tmp_path / "nope.pt", "--recipe", "resnet20-fmnist-oneshot", "--out", tmp_path / "x")
    assert result.returncode == 2 and "nope.pt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x" / "report.json").exists()
    result = invoke_cli("compress", "zoo:resnet20", "--recipe", tmp_path / "missing.yaml")
    assert result.returncode == 2 and "missing.yaml" in result.stderr
    result = invoke_cli("compress", "zoo:resnet20")
    assert result.returncode == 2 and "--recipe" in result.stderr


def test_explicit_tensorrt_without_gpu_exits_3_before_training(tmp_path):
    result = invoke_cli("compress", "zoo:resnet20", "--recipe", "resnet20-fmnist-oneshot", "--out", tmp_path / "trt",
                        "--set", "export.tensorrt.enabled=true")
    assert result.returncode == 3, result.stderr
    assert "export.tensorrt.enabled is true" in result.stderr
    assert not (tmp_path / "trt").exists()


def test_method_none_fine_tunes_without_pruning(tmp_path):
    import yaml

    from .conftest import tiny_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(finetune={"epochs": 1}, bench={"backends": ["ort-cpu"], "batch_sizes": [1],
                                                                               "min_runs": 3, "min_seconds": 0, "warmup_ms": 0})))
    result = invoke_cli("compress", "zoo:resnet20", "--recipe", recipe, "--out", tmp_path / "none")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "none" / "report.json").read_text())
    assert report["compressed"]["macs"] == report["dense"]["macs"] and report["method"] == {"method": "none"}
    assert report["target"]["asked"] is None and "MAC target: asked none" in (tmp_path / "none" / "report.md").read_text()
