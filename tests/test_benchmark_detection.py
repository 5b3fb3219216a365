"""benchmarks/detection.py without running compress: its recipes validate and differ only in the prune method, the
issue-33 goals are judged from the report's numbers, and the markdown marks them (and untrained models) per row."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from compressor.app.recipe import recipe_from_dict

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.append(str(BENCHMARKS))  # `from common import`; last: benchmarks/transformers.py shadows nothing
    try:
        spec = importlib.util.spec_from_file_location("bench_detection", BENCHMARKS / "detection.py")
        module = sys.modules["bench_detection"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("bench_detection", None)


def fake_report(key: str, dense: float, compressed: float, onnx: float, speedup: float) -> dict:
    second = {"map50_95": "map50", "miou": "pixel_acc"}[key]
    return {"dense": {key: dense, second: dense + 20, "macs": 1000.0, "params": 400},
            "compressed": {key: compressed, second: compressed + 20, f"onnx_{key}": onnx, "macs": 500.0,
                           "params": 100},
            "latency": [{"backend": "ort-cpu", "batch_size": 1, "speedup": speedup, "dense": {"p50": 4.0},
                         "compressed": {"p50": 4.0 / speedup}}],
            "target": {"latency": {"measured_speedup": speedup, "macs": 0.5, "tries": [{}, {}]}},
            "parity": {"onnx": {"passed": True, "max_abs_diff": 2e-5, "relative_diff": 1e-6}},
            "timings_s": {"prune_finetune": 500.0}, "wall_s": 660.0, "environment": {"cpu": "Test CPU"}}


def row(bench, model: str, method: str, asked: float, report: dict) -> dict:
    head = {"model": model, "method": method, "asked_speedup": asked, "epochs": 10, "quick": False,
            "cpu": "Test CPU (avx2)", "finished": "2025-01-02 03:04:05"}
    return head | bench.trim(report, bench.MODELS[model], asked)


def test_recipes_validate_and_share_the_budget(bench, tmp_path):
    for model in bench.MODELS:
        for sizes in (bench.Sizes(), bench.QUICK):
            built = {m: bench.recipe(model, m, 2.0, epochs=3, data=tmp_path, sizes=sizes) for m in bench.METHODS}
            for method, data in built.items():
                cfg = recipe_from_dict(data)
                assert cfg.prune.method == method and cfg.finetune.epochs == 3
                assert cfg.model.input_shape == [3, sizes.image, sizes.image]
            dpm, one = built["dpm"], built["oneshot"]
            assert {k: v for k, v in dpm.items() if k not in ("name", "description", "prune")} == \
                   {k: v for k, v in one.items() if k not in ("name", "description", "prune")}
            assert {k: v for k, v in dpm["prune"].items() if k not in ("method", "schedule", "dpm")} == \
                   {k: v for k, v in one["prune"].items() if k not in ("method", "schedule")}
    full = recipe_from_dict(bench.recipe("yolo11n", "dpm", 1.5, epochs=10, data=tmp_path))
    assert full.prune.target.latency_speedup == 1.5 and full.prune.target.backend == "ort-cpu"
    assert full.prune.target.batch == 1 and full.data.yolo == tmp_path / "data.yaml"
    assert full.prune.dpm.interval == 6  # 2000 images / batch 32 = 63 steps: the shipped recipe's interval
    quick = recipe_from_dict(bench.recipe("lraspp", "oneshot", 2.0, epochs=1, data=tmp_path, sizes=bench.QUICK))
    assert quick.prune.target.macs == 0.5 and quick.data.kind == "masks" and quick.model.num_classes == 11


def test_goals_from_the_numbers(bench):
    ok = row(bench, "yolo11n", "dpm", 1.5, fake_report("map50_95", 40.0, 39.1, 39.0, 1.46))
    assert ok["drop"] == pytest.approx(0.9) and ok["onnx_diff"] == pytest.approx(-0.1)
    assert ok["macs_ratio"] == 0.5 and ok["params_ratio"] == 0.25 and ok["loop"]["tries"] == 2
    assert (ok["speedup_met"], ok["drop_met"], ok["onnx_met"], ok["drop_limit"]) == (True, True, True, 1.0)
    bad = row(bench, "yolo11n", "oneshot", 1.5, fake_report("map50_95", 40.0, 38.9, 38.5, 1.42))
    assert (bad["speedup_met"], bad["drop_met"], bad["onnx_met"]) == (False, False, False)  # 1.42 is 5.3% short
    x2 = row(bench, "lraspp", "dpm", 2.0, fake_report("miou", 80.0, 78.2, 78.4, 2.09))
    assert (x2["speedup_met"], x2["drop_met"], x2["onnx_met"], x2["drop_limit"]) == (True, True, True, 2.0)
    other = row(bench, "lraspp", "dpm", 3.0, fake_report("miou", 80.0, 70.0, 70.0, 3.0))
    assert other["drop_limit"] is None and other["drop_met"] is None  # the issue sets no drop goal at x3


def test_markdown_marks_goals_and_untrained_models(bench, tmp_path):
    store = tmp_path / "detection"
    store.mkdir()
    rows = [row(bench, "yolo11n", "dpm", 1.5, fake_report("map50_95", 40.0, 39.1, 39.0, 1.46)),
            row(bench, "yolo11n", "oneshot", 1.5, fake_report("map50_95", 40.0, 38.9, 38.5, 1.42))]
    for r in rows:
        (store / f"{bench.tag(r['model'], r['method'], r['asked_speedup'])}.json").write_text(json.dumps(r))
    present = tmp_path / "yolo.pt"
    present.write_bytes(b"x")
    checkpoints = {"yolo11n": present, "ssdlite": tmp_path / "none.safetensors", "lraspp": tmp_path / "no.safetensors"}
    loaded = bench.load_rows(store, ["yolo11n", "lraspp"], [1.5], list(bench.METHODS), checkpoints)
    assert [(r["model"], r["method"], r.get("status")) for r in loaded] == [
        ("yolo11n", "dpm", "ok"), ("yolo11n", "oneshot", "ok"),
        ("lraspp", "dpm", "not trained yet"), ("lraspp", "oneshot", "not trained yet")]
    text = bench.render(loaded, command="python benchmarks/detection.py", cpu="Test CPU (avx2)", date="2025-01-02")
    lines = text.splitlines()
    dpm = next(line for line in lines if line.startswith("| DPM-SP+SR") and "x1.46" in line)
    one = next(line for line in lines if line.startswith("| oneshot") and "x1.42" in line)
    assert "| x1.5 | x1.46 | yes | 40.00 → 39.10 | 0.90 | yes (≤ 1) |" in dpm and "| -0.10 | yes |" in dpm
    assert "| x1.5 | x1.42 | **no** | 40.00 → 38.90 | 1.10 | **no** (≤ 1) |" in one and "| -0.40 | **no** |" in one
    assert "## lraspp" in text and "| DPM-SP+SR (DepGraph) | x1.5 | not trained yet |" in text
    assert "## ssdlite" not in text  # neither asked nor run
    assert ("- x1.5: DPM mAP50-95 39.10 (drop 0.90), oneshot 38.90 (drop 1.10): DPM − oneshot = +0.20 points; "
            "measured speedup DPM x1.46, oneshot x1.42") in text
    assert "Goals met in 2 finished runs: speedup 1, drop 1, ONNX metric 1" in text
    assert "CPU: Test CPU (avx2)" in text and "Runs finished 2025-01-02." in text
