"""The edge-device install of the README: onnx, onnxruntime, numpy, typer and rich, compressor without its
dependencies, no torch. `compressor latency-table` and `compressor bench` of ONNX files run there."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from .conftest import REPO

EDGE_PACKAGES = ["onnx", "onnxruntime", "numpy", "typer", "rich"]  # README "Deploying to ... an edge device"


def _run(*cmd, timeout=600):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_latency_table_and_bench_run_in_a_venv_without_torch(tmp_path):
    venv = tmp_path / "edge"
    _run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(*pip, *EDGE_PACKAGES)
    _run(*pip, "--no-deps", REPO)
    probe = subprocess.run([venv / "bin" / "python", "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr

    model = tmp_path / "model.onnx"
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 4)).eval()
    torch.onnx.export(net, torch.randn(1, 3, 8, 8), str(model), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}}, dynamo=False)
    cli = venv / "bin" / "compressor"
    _run(cli, "latency-table", model, "--out", tmp_path / "lut.json", "--batch", "1", "--min-runs", "3",
         "--warmup-ms", "1", "--threads", "1")
    table = json.loads((tmp_path / "lut.json").read_text())
    from compressor.deploy.hardware import ort_cpu_block
    from compressor.deploy.latency_table import sample_widths

    block = ort_cpu_block()  # the default step, derived on the device: [8, 16] with AVX2, [16] with AVX-512
    assert table["step"] == block and [r["widths"] for r in table["layers"]] == [sample_widths(16, block), [4]]
    assert table["environment"]["torch_version"] is None  # measured where torch does not exist
    _run(cli, "bench", model, "--batch", "1", "--min-runs", "3", "--min-seconds", "0", "--warmup-ms", "1",
         "--json", tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["results"]
