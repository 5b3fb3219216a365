"""compressor bench --images: a folder's images, resized to the model's input and scaled to [0, 1], are the timed
inputs (a detector's NMS cost depends on what it sees); bad folders and dynamic inputs are clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from compressor.deploy.bench_images import image_pool
from tests.conftest import invoke_cli


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-images") / "model.onnx"
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    torch.onnx.export(model, torch.rand(1, 3, 16, 12), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    return path


def write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        pixels = np.full((h, w, 3), 40 * (i + 1), np.uint8)
        pixels[..., 0] = 255  # red everywhere
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_pool_holds_the_images_resized_scaled_and_in_name_order(tmp_path):
    folder = write_images(tmp_path / "imgs", [(20, 10), (8, 8), (30, 40)])
    pool = image_pool(folder, (3, 16, 12))
    assert pool.shape == (3, 3, 16, 12) and pool.dtype == np.float32
    assert np.allclose(pool[:, 0], 1.0) and np.allclose(pool[1, 1], 80 / 255, atol=1e-6)  # 001.png's green
    grey = image_pool(folder, (1, 4, 4), limit=2)
    assert grey.shape == (2, 1, 4, 4) and 0.0 < grey.min() and grey.max() <= 1.0


def test_cli_times_the_images_and_reports_them(onnx_file, tmp_path):
    folder = write_images(tmp_path / "imgs", [(24, 24), (12, 16)])
    report = tmp_path / "bench.json"
    result = invoke_cli("bench", onnx_file, "--images", folder, "--batch", "1,2", "--min-runs", "2",
                        "--min-seconds", "0", "--warmup-ms", "0", "--json", report)
    assert result.returncode == 0, result.stderr
    assert f"inputs: 2 images from {folder}, resized to 16x12" in result.stdout
    config = json.loads(report.read_text())["config"]
    assert config["images"].startswith("2 images") and "pool" not in config
    assert [r["batch_size"] for r in json.loads(report.read_text())["results"]] == [1, 2]


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no .png"),
    ("missing", "is not a folder of images"),
    ("dynamic", "has dynamic dims"),
])
def test_bad_image_inputs_exit_2(case, message, onnx_file, tmp_path):
    folder = tmp_path / "imgs"
    model = onnx_file
    if case == "empty":
        folder.mkdir()
    elif case == "dynamic":
        write_images(folder, [(8, 8)])
        model = tmp_path / "dynamic.onnx"
        torch.onnx.export(nn.Conv2d(3, 2, 1).eval(), torch.rand(1, 3, 8, 8), str(model), input_names=["input"],
                          dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}}, dynamo=False)
    result = invoke_cli("bench", model, "--images", folder, "--batch", "1", "--min-runs", "1", "--min-seconds", "0")
    assert result.returncode == 2 and message in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
