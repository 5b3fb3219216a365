"""Hardware-aware widths (`prune.round_to: auto`) and the ONNX Runtime per-node profile (`compressor profile`)."""
from __future__ import annotations

import json
import platform

import pytest
import torch
import yaml
from torch import nn

from compressor.errors import RecipeError
from compressor.deploy.hardware import auto_round_to, ort_cpu_block
from compressor.deploy.ort_profile import compare, profile_onnx, summarize_trace
from compressor.app.recipe import load_recipe

from .conftest import invoke_cli, run_cli, tiny_recipe

x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                         reason="ONNX Runtime's NCHWc convolutions are an x86 (MLAS) feature")


# ---------------------------------------------------------------------------------------------- round_to: auto
def test_ort_cpu_block_follows_the_vector_width():
    assert ort_cpu_block(frozenset({"avx2", "fma"}), "x86_64") == 8
    assert ort_cpu_block(frozenset({"avx2", "avx512f"}), "x86_64") == 16
    assert ort_cpu_block(frozenset({"asimd"}), "aarch64") == 8


@pytest.mark.parametrize("overrides, flags, expected, reason", [
    ([], {"avx2"}, 8, "blocks of 8 channels"),
    ([], {"avx2", "avx512f"}, 16, "blocks of 16 channels"),
    (["bench.backends=[tensorrt]"], {"avx512f"}, 8, "multiples of 8"),
    (["bench.backends=[tensorrt]", "export.tensorrt.int8=true"], {"avx2"}, 32, "blocks of 32"),
    (["bench.backends=[ort-cpu, ort-trt]"], {"avx512f"}, 16, "blocks of 16 channels"),
])
def test_auto_round_to_picks_the_largest_multiple_the_targets_want(overrides, flags, expected, reason):
    recipe = load_recipe("resnet20-fmnist-oneshot", ["prune.round_to=auto", *overrides])
    value, why = auto_round_to(recipe, frozenset(flags), "x86_64")
    assert value == expected and reason in why


@pytest.mark.parametrize("value", ["0", "fast", "2.5", "true", "-8"])
def test_bad_round_to_is_one_clear_error(value):
    with pytest.raises(RecipeError) as err:
        load_recipe("resnet20-fmnist-oneshot", [f"prune.round_to={value}"])
    message = str(err.value)
    assert "prune.round_to: must be a positive whole number of channels (8, 16, ...), auto or null" in message
    assert message.count("prune.round_to") == 1


class CandidateRunner:
    """Stands in for the timing runner of one round_to candidate (the file the measurement names round_to_<n>)."""

    def __init__(self, path) -> None:
        self.step = int(path.stem.rsplit("_", 1)[1])

    def close(self) -> None:
        """Nothing to release."""


# milliseconds per candidate: 8 and 16 equally fast (within 3%), so the rule picks 8, the finer one
CANDIDATE_MS = {1: 1.0, 4: 0.9, 8: 0.505, 16: 0.5, 32: 0.52}


def test_compress_with_round_to_auto_keeps_the_measured_multiple(tmp_path, monkeypatch):
    """compress measures the candidates (here on fixed times: what is checked is what compress does with the
    measurement; test_round_to times them for real) and prunes on the chosen multiple."""
    from compressor.deploy import timing
    from compressor.prune import round_to

    monkeypatch.setattr(round_to, "timing_runner", lambda model, recipe, backend, path: CandidateRunner(path))
    monkeypatch.setattr(timing, "measure_round_robin",
                        lambda runners, batch, *args: [[CANDIDATE_MS[r.step] * 1e-3] * 10 for r in runners])
    recipe = tiny_recipe(prune={"method": "oneshot", "target": {"macs": 0.6}, "round_to": "auto"},
                         finetune={"epochs": 0}, bench={"backends": []})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke_cli("compress", "zoo:resnet20", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    chosen = json.loads((tmp_path / "run" / "round_to.json").read_text())
    assert chosen["measured"] and chosen["backend"] == "ort-cpu"  # no bench backend: measured on ONNX Runtime CPU
    assert [r["round_to"] for r in chosen["rows"]] == [1, 4, 8, 16, 32]  # every candidate up to half of 64
    assert all(r["score_ms"] == pytest.approx(CANDIDATE_MS[r["round_to"]]) for r in chosen["rows"])
    value = chosen["value"]
    assert value == 8
    fastest = min(r["score_ms"] for r in chosen["rows"])
    assert value == min(r["round_to"] for r in chosen["rows"] if r["score_ms"] <= fastest * 1.03)
    assert f"prune.round_to auto -> {value}: the finest multiple within 3% of the fastest" in " ".join(report["notes"])
    assert (tmp_path / "run" / "recipe.yaml").read_text().count("round_to: auto") == 1
    widths, dense = report["compressed"]["widths"], report["dense"]["widths"]
    changed = [name for name, w in widths.items() if w != dense[name]]
    assert changed, "nothing was pruned"
    for name in changed:  # narrow layers keep the largest power of two they can still lose
        step = value
        while step > 1 and step > dense[name] // 2:
            step //= 2
        assert widths[name] % step == 0, (name, dense[name], widths[name], value)


# ---------------------------------------------------------------------------------------------- profile
def _event(node, op, dur, cat="Node"):
    return {"cat": cat, "name": f"{node}_kernel_time", "dur": dur,
            "args": {"op_name": op, "output_type_shape": [{"float": [1, 8, 4, 4]}]}}


def test_summarize_trace_takes_per_node_medians_after_the_warmup_runs():
    events = []
    for run, (a, b, c) in enumerate([(900, 900, 900), (10, 30, 5), (20, 40, 7), (30, 50, 6)]):
        events += [_event("conv1_nchwc", "Conv", a), _event("/conv2/Conv", "FusedConv", b),
                   _event("reorder_x", "ReorderOutput", c),
                   {"cat": "Session", "name": "model_run", "dur": 1000 if run == 0 else 100 + run}]
    summary = summarize_trace(events, skip_runs=1)
    nodes = {n["node"]: n for n in summary["nodes"]}
    assert nodes["conv1_nchwc"]["us"] == 20 and nodes["conv1_nchwc"]["layout"] == "nchwc"
    assert nodes["/conv2/Conv"]["us"] == 40 and nodes["/conv2/Conv"]["layout"] == "nchw"
    assert nodes["reorder_x"]["us"] == 6 and nodes["conv1_nchwc"]["output_shape"] == [1, 8, 4, 4]
    assert summary["by_op"] == {"FusedConv (nchw)": 40, "Conv (nchwc)": 20, "ReorderOutput": 6}
    assert summary["conv_layout"] == {"nchwc": 1, "nchw": 1} and summary["reorders"] == 1
    assert summary["kernel_us"] == 66 and summary["model_run_us"] == 102
    assert [n["node"] for n in summary["nodes"]] == ["/conv2/Conv", "conv1_nchwc", "reorder_x"]


def test_compare_names_the_convolutions_that_left_the_blocked_layout():
    dense = summarize_trace([_event("a_nchwc", "Conv", 50), _event("b_nchwc", "Conv", 50)])
    slim = summarize_trace([_event("a_nchwc", "Conv", 20), _event("/b/Conv", "FusedConv", 60),
                            _event("r", "ReorderInput", 5)])
    result = compare(dense, slim)
    assert result["kernel_speedup"] == pytest.approx(100 / 85)
    rows = {r["kind"]: (r["dense_us"], r["compressed_us"]) for r in result["rows"]}
    assert rows == {"Conv (nchwc)": (100, 20), "FusedConv (nchw)": (0, 60), "ReorderInput": (0, 5)}
    assert result["diagnosis"][0].startswith("1 more of 2 convolutions run outside ONNX Runtime's NCHWc layout")
    assert "(71% of the compressed model's kernel time)" in result["diagnosis"][0]
    assert "prune.round_to: auto" in result["diagnosis"][0]
    assert result["diagnosis"][1] == "1 more layout conversions (ReorderInput/ReorderOutput) than in the dense model."
    assert compare(dense, dense)["diagnosis"] == []


def _conv_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _export(model: nn.Module, path):
    torch.onnx.export(model.eval(), torch.randn(1, 3, 32, 32), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    return path


def _ort_conv_layouts(path) -> dict[str, int]:
    """The machine's own answer: ONNX Runtime CPU's optimised graph, Conv nodes in the NCHWc domain or not."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    nodes = [n for n in onnx.load(opts.optimized_model_filepath).graph.node if n.op_type in ("Conv", "FusedConv")]
    blocked = sum(n.domain == "com.microsoft.nchwc" for n in nodes)
    return {"nchwc": blocked, "nchw": len(nodes) - blocked}


@x86
@pytest.mark.parametrize("width", [32, 13])
def test_profile_reports_the_layout_onnxruntime_chose_on_this_cpu(tmp_path, width):
    # Which widths leave the blocked layout depends on the CPU (AVX2: 8-channel blocks; AVX-512: 16) and the
    # onnxruntime version, so the expectation is read from onnxruntime's own optimised graph on this machine.
    model = _export(_conv_net(width), tmp_path / f"w{width}.onnx")
    profiled = profile_onnx(model, 2, runs=3, warmup=1)
    assert profiled["batch"] == 2 and profiled["runs"] == 3
    assert profiled["conv_layout"] == _ort_conv_layouts(model)
    assert sum(profiled["conv_layout"].values()) == 3


@x86
def test_compare_diagnoses_exactly_the_convolutions_that_left_the_layout(tmp_path):
    even = profile_onnx(_export(_conv_net(32), tmp_path / "dense.onnx"), 2, runs=3, warmup=1)
    odd = profile_onnx(_export(_conv_net(13), tmp_path / "odd.onnx"), 2, runs=3, warmup=1)
    left = odd["conv_layout"]["nchw"] - even["conv_layout"]["nchw"]
    diagnosis = compare(even, odd)["diagnosis"]
    if left > 0:
        assert diagnosis[0].startswith(f"{left} more of 3 convolutions")
    else:  # this CPU / onnxruntime runs the odd widths blocked too: nothing to diagnose about the layout
        assert not any("convolutions run outside" in line for line in diagnosis)


@x86
def test_profile_cli_writes_the_comparison_and_rejects_non_onnx(tmp_path):
    dense = _export(_conv_net(32), tmp_path / "dense.onnx")
    odd = _export(_conv_net(13), tmp_path / "odd.onnx")
    result = run_cli("profile", odd, "--baseline", dense, "--runs", "3", "--top", "2", "--json", tmp_path / "p.json")
    assert result.returncode == 0, result.stderr
    baseline = _ort_conv_layouts(dense)
    assert "convolutions in NCHWc layout:" in result.stdout
    assert f"(baseline: {baseline['nchwc']} of 3)" in result.stdout
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["baseline"]["conv_layout"] == baseline
    assert saved["model"]["conv_layout"] == _ort_conv_layouts(odd)
    if saved["model"]["conv_layout"]["nchw"] > baseline["nchw"]:
        assert "prune.round_to: auto" in result.stdout and saved["comparison"]["diagnosis"]
    bad = run_cli("profile", tmp_path / "missing.onnx")
    assert bad.returncode == 2 and "missing.onnx' does not exist" in bad.stderr
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"x")
    bad = run_cli("profile", pt)
    assert bad.returncode == 2 and "reads ONNX files, not 'model.pt'" in bad.stderr
    assert "Traceback" not in bad.stderr
