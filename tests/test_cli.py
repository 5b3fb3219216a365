"""The remaining commands: inspect, eval, export, error handling. --help through the real entry point (a separate
process); the others in-process (invoke_cli: the same Typer app, without an interpreter importing torch per call)."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from compressor.models.loading import build_arch

from .conftest import REPO, invoke_cli, requires_fmnist, run_cli, tiny_recipe

README = REPO / "README.md"
SAMPLE = REPO / "samples" / "resnet20-fmnist.safetensors"


def write_recipe(tmp_path, **sections):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**sections)))
    return path


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("compress", "inspect", "export", "bench", "eval", "recipes"):
        assert command in result.stdout


def test_inspect_lists_groups_ignored_and_costs(tmp_path):
    out = tmp_path / "inspect.json"
    result = invoke_cli("inspect", "zoo:resnet20", "--recipe", write_recipe(tmp_path), "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert len(data["groups"]) == 12 and data["ignored"] == ["fc"] and data["unprunable"] == {}
    roots = {g["root"]: g for g in data["groups"]}
    assert roots["layer1.0.conv1"]["width"] == 16
    assert "layer1.0.bn1(out)" in roots["layer1.0.conv1"]["coupled"]
    assert sum(row["macs"] for row in data["layers"]) <= data["macs"]
    assert data["prediction"] is None  # method none: nothing to predict
    assert "prunable dependency groups" in result.stdout


def test_inspect_predicts_the_recipe_target(tmp_path):
    recipe = write_recipe(tmp_path, prune={"method": "oneshot", "target": {"macs": 0.5}})
    out = tmp_path / "inspect.json"
    assert invoke_cli("inspect", "zoo:resnet20", "--recipe", recipe, "--json", out, "--no-layers").returncode == 0
    prediction = json.loads(out.read_text())["prediction"]
    assert prediction["macs_ratio"] == pytest.approx(0.5, rel=0.02) and prediction["channels_removed"] > 0


def test_inspect_names_unprunable_custom_layers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    recipe = write_recipe(tmp_path, model={"arch": "python:tests.helpers_models:with_custom_scale", "num_classes": 4,
                                            "in_channels": 1, "input_shape": [1, 16, 16]})
    out = tmp_path / "inspect.json"
    result = invoke_cli("inspect", "python:tests.helpers_models:with_custom_scale", "--recipe", recipe, "--json", out)
    assert result.returncode == 0, result.stderr
    unprunable = json.loads(out.read_text())["unprunable"]
    assert any("scale" in name and "nn.Parameter" in reason for name, reason in unprunable.items()), unprunable


def test_inspect_bad_ignore_name_suggests(tmp_path):
    recipe = write_recipe(tmp_path, model={"ignore": ["fcc"]})
    result = invoke_cli("inspect", "zoo:resnet20", "--recipe", recipe)
    assert result.returncode == 2 and "model.ignore: 'fcc' matches no module" in result.stderr
    assert "did you mean fc?" in result.stderr


def test_eval_and_export_of_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_arch("zoo:resnet20", 4, 1)
    ckpt = tmp_path / "m.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    recipe = write_recipe(tmp_path)
    result = invoke_cli("eval", ckpt, "--recipe", recipe, "--json", tmp_path / "m.json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["count"] == 64 and 0 <= metrics["top1"] <= 100
    exported = invoke_cli("export", ckpt, "--recipe", recipe, "--format", "onnx")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "m.onnx").is_file() and "64 synthetic validation samples" in exported.stdout
    onnx_eval = invoke_cli("eval", tmp_path / "m.onnx", "--recipe", recipe)
    assert f"top-1 {metrics['top1']:.2f}%" in onnx_eval.stdout


def test_export_tensorrt_without_gpu_exits_3(tmp_path):
    result = invoke_cli("export", "zoo:resnet20", "--format", "tensorrt", "--recipe", write_recipe(tmp_path))
    assert result.returncode == 3 and "--format tensorrt needs TensorRT" in result.stderr


def test_pickled_checkpoint_needs_trust_flag(tmp_path):
    model = build_arch("zoo:resnet20", 4, 1)
    torch.save(model, tmp_path / "whole.pt")
    recipe = write_recipe(tmp_path)
    refused = invoke_cli("eval", tmp_path / "whole.pt", "--recipe", recipe)
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr and "Traceback" not in refused.stderr
    assert invoke_cli("eval", tmp_path / "whole.pt", "--recipe", recipe, "--trust-checkpoint").returncode == 0


def test_debug_flag_shows_the_traceback(tmp_path):
    result = invoke_cli("--debug", "eval", tmp_path / "nope.pt", "--recipe", write_recipe(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr


@requires_fmnist
@pytest.mark.skipif(not SAMPLE.exists(), reason="sample checkpoint not built")
def test_eval_of_sample_reproduces_readme_accuracy():
    match = re.search(r"sample checkpoint: top-1 ([0-9.]+)%", README.read_text())
    assert match, "README must state the sample's accuracy"
    result = invoke_cli("eval", SAMPLE, "--recipe", "resnet20-fmnist-finetune")
    assert result.returncode == 0, result.stderr
    assert f"top-1 {match.group(1)}%" in result.stdout and "10000 samples" in result.stdout
