"""The run folder: --overwrite removes every artifact of the earlier run and nothing else, --out refuses a folder
that is not a run, and --resume never leaves the old report beside a run that may stop early."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from compressor.app.pipeline import prepare_run_dir
from compressor.app.recipe import recipe_from_dict
from compressor.errors import UsageError
from compressor.rundir import write_json

from .conftest import tiny_recipe

# what compress can write: report, checkpoint, choices, slim model, ONNX (+ external data), quantized copies,
# TensorRT engines with their logs and calibration caches, a text model's tokenizer/ and save_pretrained hf/
EARLIER_RUN = ("report.json", "report.md", "plot_widths.png", "plot_latency.png", "plot_dpm.png",
               "checkpoints/last.pt", "round_to.json", "latency_target.json", "model.pt", "slim.json",
               "weights.safetensors", "model.onnx", "model.onnx.data", "dense.onnx", "dense.onnx.data",
               "model.int8.onnx", "model.fp16.onnx", "model.fp16.onnx.data", "model.engine", "model.int8.engine",
               "model.int8.build.log", "model.int8.layers.json", "model.int8.calib-0123456789abcdef.cache",
               "hf/config.json", "hf/model.safetensors", "tokenizer/tokenizer.json")


def _recipe():
    return recipe_from_dict(tiny_recipe())


def _fill(folder, names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")


def test_overwrite_removes_every_artifact_of_the_earlier_run_and_keeps_other_files(tmp_path):
    _fill(tmp_path, ("recipe.yaml", *EARLIER_RUN, "notes.txt", "data/train.csv"))
    prepare_run_dir(tmp_path, _recipe(), resume=False, overwrite=True)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["data", "data/train.csv", "notes.txt", "recipe.yaml"]
    assert (tmp_path / "recipe.yaml").read_text().startswith("name: tiny")


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    _fill(tmp_path, ("notes.txt", "model.onnx"))
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(UsageError, match="no compressor run .*recipe.yaml or report.json") as info:
            prepare_run_dir(tmp_path, _recipe(), resume=resume, overwrite=overwrite)
        assert str(tmp_path / "tiny") in info.value.render()  # the hint names a fresh folder inside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "notes.txt"]


def test_resume_removes_the_old_report_but_keeps_the_checkpoint(tmp_path):
    recipe = _recipe()
    prepare_run_dir(tmp_path, recipe, resume=False, overwrite=False)
    _fill(tmp_path, EARLIER_RUN)
    prepare_run_dir(tmp_path, recipe, resume=True, overwrite=False)
    for name in ("report.json", "report.md", "plot_widths.png"):
        assert not (tmp_path / name).exists(), name  # a resumed run that stops early leaves no finished report
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "round_to.json").is_file()


def test_json_files_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    write_json(tmp_path / "r.json", {"inf": math.inf, "list": [float("nan"), 1.5], "np": np.float32("inf"),
                                     "tensor": torch.tensor([-math.inf, 2.0]), "tuple": ({"x": -math.inf},)})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == {
        "inf": None, "list": [None, 1.5], "np": None, "tensor": [None, 2.0], "tuple": [{"x": None}]}
