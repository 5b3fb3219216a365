"""The Python API on in-memory objects: compress(model=..., train_set=..., loss=..., metric=...) and deploy() of a
model pruned outside compress; tiny models, one epoch, a brief bench."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import compressor
from compressor.errors import DataError, RecipeError, TrainingError, UsageError

BENCH = {"backends": ["ort-cpu"], "batch_sizes": [1], "warmup_ms": 5, "min_runs": 3, "min_seconds": 0}


class Net(nn.Module):
    """Two conv-BN-ReLU blocks and a linear head on 3x8x8 images, 4 classes."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(1) == targets).float().mean().item()


def recipe(**sections) -> dict:
    base = {"name": "api", "data": {"batch_size": 16}, "prune": {"method": "oneshot", "target": {"macs": 0.6}},
            "finetune": {"epochs": 1, "memory_format": "contiguous"}, "verify": {"samples": 16}, "bench": BENCH,
            "export": {"tensorrt": {"enabled": False}}}
    return {**base, **sections}


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


# ---------------------------------------------------------------------------------------------- compress(model=...)
def test_compress_in_memory_trains_with_the_given_loss_and_reports_the_metric(tmp_path):
    calls = []

    def loss_plus_five(outputs, targets):  # cross-entropy + 5: the same gradients, a loss no CE run can show
        calls.append((tuple(outputs.shape), targets.dtype))
        return F.cross_entropy(outputs, targets) + 5.0

    model = net()
    out = tmp_path / "run"
    rng = torch.get_rng_state()
    report = compressor.compress(model=model, example_inputs=torch.zeros(2, 3, 8, 8), train_set=data(64, 1),
                                 val_set=data(32, 2), loss=loss_plus_five, metric=accuracy,
                                 recipe=recipe(gates={"max_metric_drop": 1.0}), out_dir=out)
    assert report["status"] == "ok"
    assert torch.equal(torch.get_rng_state(), rng)  # training seeded torch's generator; the caller's stream is back
    assert calls and all(shape[1] == 4 and dtype == torch.int64 for shape, dtype in calls)
    epoch = report["training"]["history"][0]
    assert epoch["train_loss"] > 5.0 > epoch["val_loss"]  # trained on the given loss, validated with cross-entropy
    assert report["inputs"]["loss"].endswith("loss_plus_five") and report["inputs"]["metric"].endswith("accuracy")
    assert report["inputs"]["model"] == "in-memory tests.test_api.Net"
    for side in ("dense", "compressed"):  # the metric is accuracy as a fraction: top-1 / 100 on the same samples
        assert report[side]["metric"] == pytest.approx(report[side]["top1"] / 100)
    assert epoch["val_metric"] == pytest.approx(epoch["val_top1"] / 100)
    assert report["compressed"]["onnx_metric"] == pytest.approx(report["compressed"]["onnx_top1"] / 100)
    gate = next(g for g in report["gates"] if g["name"] == "max_metric_drop")
    assert gate["value"] == pytest.approx(report["dense"]["metric"] - report["compressed"]["metric"])
    # the run directory is the CLI's, and the model given is now the compressed model
    for name in ("recipe.yaml", "report.json", "report.md", "model.onnx", "dense.onnx", "slim.json",
                 "weights.safetensors"):
        assert (out / name).is_file(), name
    assert report["compressed"]["macs"] / report["dense"]["macs"] == pytest.approx(0.6, rel=0.05)
    assert model.c1.out_channels == report["compressed"]["widths"]["c1"] < 16
    assert report["parity"]["onnx"]["passed"] and report["latency"][0]["backend"] == "ort-cpu"
    md = (out / "report.md").read_text()
    assert "Training loss `tests.test_api." in md and "| metric |" in md and "val metric" in md
    # the slim model reloads without pickle into a fresh instance of the user's class
    from compressor.models.slim import load_slim

    reloaded = load_slim(out, model=Net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model.eval()(x), atol=1e-6)


def test_model_of_a_local_class_is_saved_without_model_pt(tmp_path):
    from compressor.models.config import ModelConfig
    from compressor.models.slim import load_slim, save_slim

    class Local(nn.Module):  # torch.save of the module cannot pickle a class defined in a function
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    saved = save_slim(Local(), tmp_path, ModelConfig())
    assert "model_pt" not in saved and not (tmp_path / "model.pt").exists()
    with pytest.raises(compressor.errors.ModelLoadError, match="load_slim\\(path, model=MyModel\\(\\)\\)"):
        load_slim(tmp_path)
    assert load_slim(tmp_path, model=Local()).fc.weight.shape == (2, 3)


@pytest.mark.parametrize("kwargs, error, words", [
    ({}, UsageError, ["needs example inputs", "example_inputs=", "model.input_shape"]),
    ({"example_inputs": torch.zeros(4, 20)}, UsageError, ["shape [4, 20]", "(N, C, H, W)", "(N, T)"]),
    ({"example_inputs": [torch.zeros(1, 3, 8, 8)]}, UsageError, ["one torch.Tensor batch, not a list"]),
    ({"example_inputs": torch.zeros(1, 3, 8, 8), "train_set": data(8, 0)}, UsageError,
     ["train_set was given but val_set was not"]),
    ({"example_inputs": torch.zeros(1, 3, 8, 8), "train_set": data(8, 0),
      "val_set": TensorDataset(torch.zeros(4, 3, 9, 9), torch.zeros(4, dtype=torch.long))}, DataError,
     ["val_set[0]'s input is [3, 9, 9]", "[3, 8, 8]"]),
    ({"example_inputs": torch.zeros(1, 3, 8, 8), "train_set": data(8, 0),
      "val_set": TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4))}, DataError,
     ["val_set[0]'s target is a torch.float32 tensor", "class indices"]),
    ({"example_inputs": torch.zeros(1, 3, 8, 8), "loss": "mse"}, UsageError, ["loss must be a callable"]),
    ({"example_inputs": torch.zeros(1, 3, 8, 8), "checkpoint": "zoo:resnet20"}, UsageError,
     ["both a checkpoint", "give one of them"]),
    ({"example_inputs": torch.zeros(1, 3, 8, 8), "recipe": recipe(gates={"max_metric_drop": 0.01})}, RecipeError,
     ["gates.max_metric_drop", "metric="]),
])
def test_bad_arguments_are_named_before_any_work(tmp_path, kwargs, error, words):
    kwargs = {"model": net(), "recipe": recipe(), "out_dir": tmp_path / "run", **kwargs}
    with pytest.raises(error) as caught:
        compressor.compress(**kwargs)
    assert caught.value.exit_code == 2
    for word in words:
        assert word in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_the_cli_has_no_metric_so_a_metric_gate_is_a_recipe_error(tmp_path):
    from .conftest import invoke_cli, tiny_recipe

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(tiny_recipe(gates={"max_metric_drop": 0.5})))
    result = invoke_cli("compress", "zoo:resnet20", "--recipe", path, "--out", tmp_path / "run")
    assert result.returncode == 2 and "gates.max_metric_drop" in result.stderr and "metric=" in result.stderr
    assert not (tmp_path / "run").exists()


def test_recipe_input_shape_stands_in_for_example_inputs(tmp_path):
    from compressor.app.in_memory import model_section
    from compressor.app.recipe import as_recipe

    given = as_recipe(recipe(model={"input_shape": [3, 8, 8], "in_channels": 3, "ignore": ["fc"]}))
    section = model_section(net(), None, given.model)
    assert (section.input_shape, section.num_classes, section.ignore, section.arch) == ([3, 8, 8], 4, ["fc"], None)
    with pytest.raises(UsageError, match=r"\[3, 16, 16\] but the recipe's model.input_shape is \[3, 8, 8\]"):
        model_section(net(), torch.zeros(1, 3, 16, 16), given.model)


def test_a_loss_that_is_not_a_scalar_tensor_stops_training_with_its_name():
    from compressor.train.config import FinetuneConfig
    from compressor.train.loop import make_loss

    def per_sample(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    with pytest.raises(TrainingError, match=r"per_sample\(outputs, targets\) returned a tensor of shape \[4\]"):
        make_loss(FinetuneConfig(), None, per_sample)(net(), x, y)
    with pytest.raises(TrainingError, match="returned a float"):
        make_loss(FinetuneConfig(), None, lambda o, t: 1.0)(net(), x, y)


@pytest.mark.parametrize("metric, got", [(lambda o, t: o, "a tensor of shape [4, 4]"), (lambda o, t: "high", "a str"),
                                         (lambda o, t: float("nan"), "nan")])
def test_a_metric_that_is_not_one_number_is_named(metric, got):
    from compressor.train.loop import evaluate

    with pytest.raises(UsageError, match=re.escape(f"the metric <lambda>(outputs, targets) returned {got}")):
        evaluate(net(), data(8, 0), batch_size=4, metric=metric)


# ---------------------------------------------------------------------------------------------- deploy()
def hand_pruned(dense: Net) -> Net:
    """The dense model with 4 of c1's 16 channels removed by torch-pruning directly (pruned outside compress)."""
    import torch_pruning as tp

    slim = copy.deepcopy(dense).eval()
    graph = tp.DependencyGraph().build_dependency(slim, example_inputs=torch.zeros(1, 3, 8, 8))
    graph.get_pruning_group(slim.c1, tp.prune_conv_out_channels, idxs=[0, 5, 9, 13]).prune()
    return slim


def test_deploy_of_a_hand_pruned_model_writes_a_verified_onnx_and_a_bench_row(tmp_path):
    dense = net().eval()
    slim = hand_pruned(dense)
    val = data(32, 2)
    out = tmp_path / "deployed"
    report = compressor.deploy(slim, torch.zeros(1, 3, 8, 8), out, dense_model=dense, val_set=val, metric=accuracy,
                               recipe={"verify": {"samples": 16}, "bench": BENCH, "gates": {"max_accuracy_drop": 100}})
    assert report["status"] == "ok" and report["training"] is None and report["recipe"]["prune"]["method"] == "none"
    assert (out / "model.onnx").is_file() and (out / "dense.onnx").is_file()
    parity = report["parity"]["onnx"]
    assert parity["passed"] and parity["samples"] == 16 and parity["max_abs_diff"] <= 1e-4
    assert report["dense"]["widths"]["c1"] == 16 and report["compressed"]["widths"]["c1"] == 12
    assert report["compressed"]["macs"] < report["dense"]["macs"]
    assert report["compressed"]["onnx_top1"] == pytest.approx(report["compressed"]["top1"], abs=1e-6)
    assert report["compressed"]["metric"] == pytest.approx(report["compressed"]["top1"] / 100)
    assert report["compressed"]["onnx_metric"] == pytest.approx(report["compressed"]["metric"], abs=1e-6)
    (row,) = report["latency"]
    assert (row["backend"], row["batch_size"]) == ("ort-cpu", 1) and row["compressed"]["count"] >= 3
    assert row["speedup"] == pytest.approx(row["dense"]["p50"] / row["compressed"]["p50"])
    assert [g["name"] for g in report["gates"]] == ["max_accuracy_drop"]
    assert json.loads((out / "report.json").read_text())["parity"]["onnx"]["passed"]
    md = (out / "report.md").read_text()
    assert "deployed with `compressor.deploy`" in md and "## Export parity (real validation samples)" in md
    assert slim.c1.out_channels == 12 and not slim.training  # the given model is left as it was


def test_deploy_without_dense_model_or_data_checks_parity_on_random_inputs(tmp_path):
    slim = hand_pruned(net().eval())
    report = compressor.deploy(slim, torch.zeros(1, 3, 8, 8), tmp_path / "alone",
                               recipe={"verify": {"samples": 8}, "bench": BENCH})
    assert report["status"] == "ok" and report["dense"] is None and "top1" not in report["compressed"]
    assert report["parity"]["onnx"]["passed"] and report["parity"]["onnx"]["samples"] == 8
    assert any("8 seeded random inputs" in note for note in report["notes"])
    (row,) = report["latency"]
    assert row["dense"] is None and row["speedup"] is None and row["compressed"]["p50"] > 0
    md = (tmp_path / "alone" / "report.md").read_text()
    assert "no dense model given, so no speedup" in md and "seeded random inputs: no validation set" in md


def test_deploy_after_a_pruner_in_a_plain_loop_reports_its_method_and_target(tmp_path):
    dense = net()
    model, train = copy.deepcopy(dense), data(64, 1)
    loader = torch.utils.data.DataLoader(train, batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = compressor.Pruner(model, torch.zeros(1, 3, 8, 8), prune={"method": "oneshot", "target": {"macs": 0.6}},
                               epochs=1, steps_per_epoch=len(loader), optimizer=optimizer)
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        pruner.after_backward(loss)
        optimizer.step()
        pruner.after_step()
    pruner.epoch_end()
    pruner.finalize()
    report = compressor.deploy(model, torch.zeros(1, 3, 8, 8), tmp_path / "run", dense_model=dense.eval(),
                               val_set=data(32, 2), pruner=pruner,
                               recipe={"verify": {"samples": 16}, "bench": {"backends": []}})
    assert report["recipe"]["prune"]["method"] == "oneshot" and report["method"]["events"][0]["removed"] > 0
    target = report["target"]
    assert target["asked_macs_ratio"] == 0.6 and target["met"] is True
    assert target["achieved_macs_ratio"] == pytest.approx(report["compressed"]["macs"] / report["dense"]["macs"])
    assert report["parity"]["onnx"]["passed"] and report["latency"] == []
    md = (tmp_path / "run" / "report.md").read_text()
    assert "by a `compressor.Pruner` (method `oneshot`" in md and "## Pruning events" in md


@pytest.mark.parametrize("args, kwargs, words", [
    ((None,), {}, ["deploy needs example inputs", "example_inputs="]),
    ((torch.zeros(1, 3, 8, 8),), {"recipe": {"gates": {"max_accuracy_drop": 1.0}}},
     ["compares with the dense model's top-1: pass dense_model=", "pass val_set="]),
    ((torch.zeros(1, 3, 8, 8),), {"recipe": {"export": {"quantize": "int8"}, "gates": {"max_accuracy_drop": 1.0}},
                                  "dense_model": Net(), "val_set": data(8, 0)},
     ["calibrates on training samples: pass train_set="]),
])
def test_deploy_names_what_is_missing(tmp_path, args, kwargs, words):
    with pytest.raises(UsageError) as caught:
        compressor.deploy(net(), *args, tmp_path / "run", **kwargs)
    for word in words:
        assert word in str(caught.value)
    assert caught.value.exit_code == 2 and not (tmp_path / "run").exists()
