"""ONNX export: models over protobuf's 2 GB keep one data file beside the graph, files are readable by others."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from compressor.deploy import export
from compressor.deploy.export import consolidate_external_data, export_onnx, onnx_bytes
from compressor.deploy.config import OnnxConfig


def small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def ort_out(path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def per_tensor_exporter(real_export):
    """What the TorchScript exporter does over 2 GB: one file per tensor, named after the tensor, beside the graph."""
    def fake(model, args, f, **kwargs):
        real_export(model, args, f, **kwargs)
        onnx.save_model(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    return fake


def test_export_is_one_file_readable_by_other_users(tmp_path):
    x = torch.randn(2, 3, 12, 12)
    info = export_onnx(small(0), x[:1], tmp_path / "model.onnx", OnnxConfig(simplify=False))
    umask = os.umask(0)
    os.umask(umask)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no work directory or temporary file left
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o666 & ~umask
    assert info["external_data"] is None and info["bytes"] == (tmp_path / "model.onnx").stat().st_size


def test_consolidate_turns_per_tensor_files_into_one_data_file(tmp_path):
    x = torch.randn(2, 3, 12, 12)
    graph = tmp_path / "model.onnx"
    torch.onnx.export(small(0), (x[:1],), str(graph), input_names=["input"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    expected = ort_out(graph, x)
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 5  # graph + 2 weights + 2 biases
    assert consolidate_external_data(graph) == len(onnx.load(str(graph), load_external_data=False).graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_allclose(ort_out(graph, x), expected, rtol=0, atol=0)
    assert onnx_bytes(graph) == graph.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size


def test_two_large_models_in_one_directory_keep_their_own_weights(tmp_path, monkeypatch):
    """dense.onnx and model.onnx share tensor names: per-tensor files would overwrite each other's weights."""
    monkeypatch.setattr(torch.onnx, "export", per_tensor_exporter(torch.onnx.export))
    x = torch.randn(2, 3, 12, 12)
    models = {"model.onnx": small(0), "dense.onnx": small(1)}
    infos = {name: export_onnx(m, x[:1], tmp_path / name, OnnxConfig()) for name, m in models.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx", "dense.onnx.data", "model.onnx", "model.onnx.data"]
    for name, model in models.items():
        with torch.no_grad():
            np.testing.assert_allclose(ort_out(tmp_path / name, x), model(x).numpy(), atol=1e-5)
        assert infos[name]["external_data"] == f"{name}.data" and not infos[name]["simplified"]
        assert infos[name]["bytes"] == onnx_bytes(tmp_path / name) > (tmp_path / name).stat().st_size
    monkeypatch.undo()  # a small export over a large one removes the large one's data file
    export_onnx(small(2), x[:1], tmp_path / "model.onnx", OnnxConfig())
    assert not (tmp_path / "model.onnx.data").exists() and (tmp_path / "dense.onnx.data").exists()
    with torch.no_grad():
        np.testing.assert_allclose(ort_out(tmp_path / "model.onnx", x), small(2)(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("over", [False, True])
def test_dynamo_exporter_uses_external_data_only_over_the_limit(tmp_path, monkeypatch, over):
    monkeypatch.setattr(export, "_over_proto_limit", lambda model: over)
    x = torch.randn(2, 3, 12, 12)
    info = export_onnx(small(0), x[:1], tmp_path / "model.onnx", OnnxConfig(dynamo=True))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["model.onnx", "model.onnx.data"] if over else ["model.onnx"])
    assert info["external_data"] == ("model.onnx.data" if over else None)
    with torch.no_grad():
        np.testing.assert_allclose(ort_out(tmp_path / "model.onnx", x), small(0)(x).numpy(), atol=1e-5)


def test_over_proto_limit_counts_parameters_and_buffers():
    class Big(nn.Module):
        def __init__(self, floats: int) -> None:
            super().__init__()
            self.register_buffer("table", torch.empty(0))
            self.table = torch.empty(floats, device="meta")

    assert not export._over_proto_limit(Big(400_000_000))  # 1.6 GB
    assert export._over_proto_limit(Big(540_000_000))  # 2.16 GB


def test_too_little_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from compressor.errors import ExportError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError) as err:
        export_onnx(small(0), torch.randn(1, 3, 12, 12), tmp_path / "model.onnx", OnnxConfig())
    assert f"{tmp_path} has 0.00 GB free" in str(err.value) and "needs about 0.00 GB" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_filling_up_mid_export_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from compressor.errors import ExportError

    def full(model, args, f, **kwargs):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full)
    with pytest.raises(ExportError) as err:
        export_onnx(small(0), torch.randn(1, 3, 12, 12), tmp_path / "model.onnx", OnnxConfig())
    assert "the disk filled up while writing" in str(err.value) and "Free disk space" in err.value.render()
    assert list(tmp_path.iterdir()) == []


class ResizedWhenTraced(nn.Module):
    """DINOv2 with registers' pattern: while traced (torch.jit.is_tracing) it resizes a tensor to its own size with
    antialiased bicubic interpolation, an operator the TorchScript exporter has no ONNX form for."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small(0)
        self.pos = nn.Parameter(torch.randn(1, 3, 4, 4))

    def forward(self, x):
        pos = self.pos
        if torch.jit.is_tracing():
            pos = nn.functional.interpolate(pos, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
        return self.net(x + pos.repeat(1, 1, 3, 3))


def test_an_operator_the_torchscript_exporter_lacks_exports_with_dynamo(tmp_path):
    """It was an ExportError (after training, in compress) although export.onnx.dynamo exports the model."""
    x = torch.randn(2, 3, 12, 12)
    model = ResizedWhenTraced().eval()
    info = export_onnx(model, x[:1], tmp_path / "model.onnx", OnnxConfig())
    assert info["exporter"] == "dynamo" and "aten::_upsample_bicubic2d_aa" in info["fallback"]
    with torch.no_grad():
        np.testing.assert_allclose(ort_out(tmp_path / "model.onnx", x), model(x).numpy(), rtol=1e-4, atol=1e-5)
