"""Per-layer latency tables: probe graphs built with onnx, timed in ONNX Runtime, without torch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compressor.deploy.latency_table import Layer, probe_graph, prunable_layers, read_table, sample_widths
from compressor.errors import UsageError

from .conftest import REPO


def _export(tmp_path, model, shape=(3, 16, 16)):
    path = tmp_path / "model.onnx"
    torch.onnx.export(model.eval(), torch.randn(1, *shape), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}}, dynamo=False)
    return path


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU(), nn.Conv2d(24, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_layers_are_found_with_their_input_shapes_and_attributes(tmp_path):
    import onnx

    layers = prunable_layers(onnx.load(str(_export(tmp_path, _net()))))
    assert [(layer.op, layer.input_shape, layer.width, layer.depthwise) for layer in layers] == [
        ("Conv", (3, 16, 16), 24, False), ("Conv", (24, 8, 8), 24, True), ("Conv", (24, 8, 8), 16, False),
        ("Gemm", (16,), 5, False)]
    assert layers[0].attributes["strides"] == [2, 2]


@pytest.mark.parametrize("layer, width, out_shape", [
    (Layer("c", "Conv", (3, 16, 16), (24, 3, 3, 3), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}),
     8, (2, 8, 8, 8)),
    (Layer("d", "Conv", (24, 8, 8), (24, 1, 3, 3), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 24}),
     16, (2, 16, 8, 8)),
    (Layer("g", "Gemm", (16,), (5, 16), {"transB": 1}), 3, (2, 3)),
    (Layer("m", "MatMul", (7, 32), (32, 64), {}), 40, (2, 7, 40)),
])
def test_a_probe_computes_the_layer_at_the_asked_width(layer, width, out_shape):
    session = ort.InferenceSession(probe_graph(layer, width).SerializeToString(), providers=["CPUExecutionProvider"])
    shape = list(layer.input_shape)
    if layer.depthwise:
        shape[0] = width  # a depthwise layer's channels go with its inputs
    (y,) = session.run(None, {"X": np.ones((2, *shape), np.float32)})
    assert y.shape == out_shape


def test_sampled_widths():
    assert sample_widths(24, 8) == [8, 16, 24]
    assert sample_widths(20, 8) == [8, 16, 20]
    assert sample_widths(5, 8) == [5]
    assert sample_widths(2048, 8, 16) == list(range(128, 2049, 128))  # coarser multiples of 8 for a wide layer
    assert sample_widths(64, 8, 16) == list(range(8, 65, 8)) and len(sample_widths(1000, 8, 16)) <= 16


def test_the_table_is_measured_without_torch_and_refuses_other_targets(tmp_path):
    model = _export(tmp_path, _net())
    out = tmp_path / "lut.json"
    code = ("import sys; sys.modules['torch'] = None\n"  # as on an edge device: importing torch fails
            "from compressor.app.cli import main; sys.argv = ['compressor', 'latency-table', sys.argv[1], '--out', "
            "sys.argv[2], '--batch', '1,2', '--step', '8', '--min-runs', '3', '--warmup-ms', '1', '--threads', '1']; "
            "main()")
    result = subprocess.run([sys.executable, "-c", code, str(model), str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads(out.read_text())
    assert table["backend"] == "ort-cpu" and table["batches"] == [1, 2] and table["threads"] == 1
    assert table["environment"]["onnxruntime_version"] == ort.__version__ and table["environment"]["cpu"]
    rows = table["layers"]
    assert [r["widths"] for r in rows] == [[8, 16, 24], [8, 16, 24], [8, 16], [5]]
    assert all(len(r["p50_ms"][b]) == len(r["widths"]) and min(r["p50_ms"][b]) > 0 for r in rows for b in ("1", "2"))

    assert all(r["overhead_ms"][b] > 0 for r in rows for b in ("1", "2"))
    assert set(table["model_p50_ms"]) == {"1", "2"} and table["model"]["input_shape"] == [3, 16, 16]

    assert read_table(out, backend="ort-cpu", batch=2)["layers"] == rows
    with pytest.raises(UsageError, match="its runtime is ort-cpu, the target is ort-cuda; it has batch 1, 2, the "
                                         "target is batch 8") as info:
        read_table(out, backend="ort-cuda", batch=8)
    assert info.value.exit_code == 2 and "compressor latency-table" in info.value.hint
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a readable latency table"):
        read_table(tmp_path / "bad.json", backend="ort-cpu", batch=1)
    (tmp_path / "partial.json").write_text(json.dumps({"format": table["format"], "backend": "ort-cpu"}))
    with pytest.raises(UsageError, match="model, batches, layers missing or malformed"):
        read_table(tmp_path / "partial.json", backend="ort-cpu", batch=1)


def test_layers_alike_are_measured_once(tmp_path):
    from compressor.deploy.latency_table import measure_table

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1))
    table = measure_table(_export(tmp_path, net), batches=(1,), warmup_ms=1, min_runs=2, min_seconds=0.0)
    rows = table["layers"]
    assert [r.get("same_as") for r in rows] == [None, None, rows[1]["name"], None]  # the stride-2 conv differs
    assert rows[2]["p50_ms"] == rows[1]["p50_ms"] and rows[2]["name"] != rows[1]["name"]


def test_output_shapes_follow_stride_padding_and_dilation():
    from compressor.deploy.latency_table import output_shape

    conv = Layer("c", "Conv", (8, 15, 16), (24, 8, 3, 3),
                 {"strides": [2, 1], "pads": [1, 0, 1, 0], "dilations": [1, 2], "kernel_shape": [3, 3]})
    assert output_shape(conv) == (24, 8, 12)  # (15 + 2 - 3) // 2 + 1, (16 - 4 - 1) // 1 + 1
    assert output_shape(Layer("g", "Gemm", (64,), (10, 64), {"transB": 1})) == (10,)
    assert output_shape(Layer("m", "MatMul", (197, 768), (768, 3072), {})) == (197, 3072)


def test_every_layer_gets_its_time_inside_the_whole_model(tmp_path):
    """The in-context profile matches each node to its layer by shapes (fused and blocked convolutions included),
    scaled so that the profiler's own slowdown is taken out."""
    from compressor.deploy.latency_table import layer_factors, measure_table, probe_ms

    from compressor.deploy.hardware import ort_cpu_block
    from compressor.deploy.latency_table import default_step

    table = measure_table(_export(tmp_path, _net()), batches=(1, 2), warmup_ms=1, min_runs=3, min_seconds=0.0)
    assert table["step"] == ort_cpu_block() == default_step("ort-cpu")  # this CPU's block: 16 with AVX-512, else 8
    assert default_step("ort-cuda") == default_step("ort-trt") == 8
    for batch in ("1", "2"):
        context = table["context"][batch]
        assert context["matched"] == context["layers"] == len(table["layers"]) == 4
        assert 0 < context["scale"] <= 1.5 and context["profiled_run_ms"] > 0
        for row in table["layers"]:
            assert 0 < row["context_ms"][batch] < table["model_p50_ms"][batch]
        factors = layer_factors(table, int(batch))
        for row, factor in zip(table["layers"], factors):  # a layer below the timing noise still has a probe time
            assert factor * probe_ms(row, batch)[-1] == pytest.approx(row["context_ms"][batch])


def test_a_layer_matches_its_node_in_the_blocked_layout_of_either_block_size():
    """ORT-CPU pads blocked convolutions to its block (8 on AVX2, 16 on AVX-512) and profiles the padded shapes;
    a 24-channel layer must find its node on both machine classes, and an input narrower than the block stays."""
    from compressor.deploy.latency_table import _layer_keys

    first = Layer("a", "Conv", (3, 16, 16), (24, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]})
    assert _layer_keys(first) == [("conv", (3, 16, 16), (24, 8, 8), (24, 3, 3, 3)),
                                  ("conv", (3, 16, 16), (32, 8, 8), (32, 3, 3, 3))]
    depthwise = Layer("d", "Conv", (24, 8, 8), (24, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 24})
    assert ("conv", (32, 8, 8), (32, 8, 8), (32, 1, 3, 3)) in _layer_keys(depthwise)
    pointwise = Layer("p", "Conv", (24, 8, 8), (20, 24, 1, 1), {})
    keys = _layer_keys(pointwise)
    assert keys[0] == ("conv", (24, 8, 8), (20, 8, 8), (20, 24, 1, 1))
    assert keys.index(("conv", (24, 8, 8), (24, 8, 8), (24, 24, 1, 1))) < keys.index(
        ("conv", (32, 8, 8), (32, 8, 8), (32, 32, 1, 1)))  # the AVX2 block is tried before the AVX-512 one
    assert _layer_keys(Layer("g", "Gemm", (16,), (5, 16), {"transB": 1})) == [("linear", (16,), (5,), ())]


def test_layers_the_profile_did_not_match_take_the_median_factor():
    from compressor.deploy.latency_table import layer_factors

    def row(probe, context=None):
        r = {"p50_ms": {"1": [probe / 2, probe + 0.1]}, "overhead_ms": {"1": 0.1}}
        return {**r, "context_ms": {"1": context}} if context is not None else r

    noise = {"p50_ms": {"1": [0.09, 0.1]}, "overhead_ms": {"1": 0.1}, "context_ms": {"1": 0.2}}
    table = {"layers": [row(1.0, 0.5), row(2.0, 0.5), row(1.0, 2.0), row(3.0), noise]}
    # the last layer is no slower than the identity probe: its probe time is 2% of its smallest raw time; the
    # unmatched fourth takes the median (upper middle) of 0.25, 0.5, 2.0 and 111
    assert layer_factors(table, 1) == pytest.approx([0.5, 0.25, 2.0, 2.0, 0.2 / 0.0018])
    assert layer_factors({"layers": [row(1.0), row(2.0)]}, 1) == [1.0, 1.0]  # a table without a context
