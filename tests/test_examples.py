"""The three examples (examples/) on tiny data, each ending in a verified ONNX model and a report; and the plain
loop with cross-entropy against `compressor compress` on the same recipe: the same widths and top-1.

The examples run in this process (their main(argv)), on Fashion-MNIST subsets of one epoch."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from .conftest import REPO, requires_fmnist

EXAMPLES = REPO / "examples"
SAMPLE = REPO / "samples" / "resnet20-fmnist.safetensors"
RECIPE = REPO / "recipes" / "resnet20-fmnist-dpm.yaml"
# deployment: parity on 64 validation samples, ORT-CPU at batch 1 timed briefly
DEPLOY = ["verify.samples=64", "bench.backends=[ort-cpu]", "bench.batch_sizes=[1]", "bench.min_runs=5",
          "bench.min_seconds=0", "bench.warmup_ms=20", "gates.max_accuracy_drop=null"]
# one epoch of 4 optimizer steps: the DPM event at step 0, its 4 decay steps one step apart (the last removes)
TINY = ["data.train_subset=512", "data.val_subset=256", "finetune.epochs=1", "prune.dpm.steps=4",
        "prune.dpm.interval=1", "prune.round_to=8", *DEPLOY]


def example(name: str):
    """examples/NAME.py as a module (its main(argv) runs the example and returns the deploy report)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sets(overrides: list[str]) -> list[str]:
    return [arg for value in overrides for arg in ("--set", value)]


def assert_verified(report: dict, out: Path) -> None:
    """A finished deploy: the ONNX file, its parity with PyTorch on real validation samples, the report files."""
    assert report["status"] == "ok"
    parity = report["parity"]["onnx"]
    assert parity["passed"] is True and parity["samples"] == 64
    assert parity["max_abs_diff"] <= parity["allowed_abs_diff"] and parity["top1_agreement"] >= 0.999
    assert report["compressed"]["onnx_top1"] == pytest.approx(report["compressed"]["top1"], abs=0.5)
    for name in ("model.onnx", "report.json", "report.md", "weights.safetensors", "slim.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["parity"]["onnx"]["passed"] is True


def pruning_lines(path: Path) -> list[str]:
    """The lines of an example that call compressor's pruning (the Pruner and its hooks, batch-norm recalibration)."""
    return [line for line in path.read_text().splitlines()
            if re.search(r"\bcompressor\.Pruner\(|\bpruner\.\w+\(|recalibrate_batch_norm\(", line)
            and not line.lstrip().startswith(("#", "from ", "import "))]


def test_plain_loop_prunes_in_five_marked_lines_with_a_loss_that_is_not_cross_entropy():
    path = EXAMPLES / "plain_loop.py"
    marked = [line for line in path.read_text().splitlines() if line.rstrip().endswith("# compressor")]
    assert len(marked) <= 5
    assert pruning_lines(path) == marked  # every pruning call is marked, and only those are
    focal = example("plain_loop").focal_loss
    logits, targets = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10
    assert focal(logits, targets, gamma=0.0) == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert focal(logits, targets).item() < 0.9 * F.cross_entropy(logits, targets).item()  # gamma 2: another loss


@requires_fmnist
def test_plain_loop_with_focal_loss_ends_in_a_verified_onnx(tmp_path):
    out = tmp_path / "plain"
    report = example("plain_loop").main(["--checkpoint", str(SAMPLE), "--recipe", str(RECIPE), "--out", str(out),
                                         *sets(TINY)])
    assert_verified(report, out)
    assert report["compressed"]["macs"] / report["dense"]["macs"] == pytest.approx(0.5, rel=0.02)  # macs 0.5
    assert report["compressed"]["widths"]["layer1.0.conv1"] < report["dense"]["widths"]["layer1.0.conv1"] == 16


@requires_fmnist
def test_plain_loop_with_cross_entropy_gives_compress_widths_and_top1(tmp_path):
    """Must-show 2 with a small budget: the same recipe, seed and data through the example's loop and through
    `compressor compress` (contiguous memory format, as the plain loop trains) give the same widths and top-1."""
    from compressor import compress

    quick = [*TINY, "finetune.memory_format=contiguous", "bench.backends=[]"]  # no bench: it is not compared
    reference = compress(SAMPLE, RECIPE, tmp_path / "compress", overrides=tuple(quick))
    ours = example("plain_loop").main(["--checkpoint", str(SAMPLE), "--recipe", str(RECIPE), "--loss", "ce",
                                       "--out", str(tmp_path / "plain"), *sets(quick)])
    assert ours["compressed"]["widths"] == reference["compressed"]["widths"]
    assert ours["compressed"]["widths"] != reference["dense"]["widths"]
    assert abs(ours["compressed"]["top1"] - reference["compressed"]["top1"]) <= 0.1
    assert ours["compressed"]["macs"] == reference["compressed"]["macs"]


@requires_fmnist
def test_hf_trainer_example_prunes_in_the_trainer_and_ends_in_a_verified_onnx(tmp_path):
    out = tmp_path / "hf"
    report = example("hf_trainer").main(["--epochs", "1", "--train-subset", "256", "--val-subset", "256",
                                         "--out", str(out), *sets(DEPLOY)])
    assert_verified(report, out)
    event = report["method"]["events"][0]  # the Pruner's summary, through deploy(pruner=...)
    assert event["removed"] > 0 and event["achieved_macs"] == pytest.approx(0.6, abs=0.03)
    assert report["dense"] is None and report["target"]["asked_macs_ratio"] == 0.6
    assert report["compressed"]["widths"]["model.resnet.encoder.stages.0.layers.0.layer.0.convolution"] < 16


@requires_fmnist
def test_lightning_example_prunes_in_fit_and_ends_in_a_verified_onnx(tmp_path):
    out = tmp_path / "lightning"
    report = example("lightning_module").main(["--checkpoint", str(SAMPLE), "--recipe", str(RECIPE), "--epochs", "1",
                                               "--out", str(out), *sets(TINY)])
    assert_verified(report, out)
    assert report["target"]["met"] is True and report["target"]["achieved_macs_ratio"] == pytest.approx(0.5, rel=0.02)
    assert report["compressed"]["widths"]["layer1.0.conv1"] < report["dense"]["widths"]["layer1.0.conv1"] == 16
    assert report["compressed"]["top1"] > 50  # batch-norm statistics re-estimated after the removal at the last step
