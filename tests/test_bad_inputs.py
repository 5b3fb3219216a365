"""Every bad input gets one clear paragraph (issue 14): exit 2 (3 for a missing backend or GPU), the offending field
or file named, no Python traceback, and no artifact left that looks complete. One row per bad input, across every
command; most rows run the Typer app in-process (fast), the `sub` rows through the real entry point in a subprocess
to prove that no traceback reaches a terminal."""
from __future__ import annotations

import pickle
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import pytest
import torch
import yaml

from compressor.errors import RecipeError, UsageError
from compressor.models.loading import build_arch

from .conftest import REPO, invoke_cli, run_cli, tiny_recipe

FAST = ["--warmup-ms", "0", "--min-runs", "1", "--min-seconds", "0"]


def _cuda() -> bool:
    return torch.cuda.is_available()


def _ort_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _ort_trt() -> bool:
    import onnxruntime

    return "TensorrtExecutionProvider" in onnxruntime.get_available_providers()


def _tensorrt() -> bool:
    from compressor.deploy.tensorrt_engine import tensorrt_available

    return tensorrt_available()[0]


def _recipe(**sections) -> dict:
    """The tiny recipe made quick: no fine-tuning, no benchmark."""
    data = tiny_recipe(**sections)
    data["finetune"].setdefault("epochs", 0)
    data.setdefault("bench", {}).setdefault("backends", [])
    return data


def _write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> SimpleNamespace:
    """The bad (and a few good) inputs, made once."""
    d = tmp_path_factory.mktemp("bad-inputs")
    ns = SimpleNamespace(dir=d)
    quick = {"finetune": {"epochs": 0}, "bench": {"backends": []}}
    ns.recipe = _write_yaml(d / "recipe.yaml", _recipe(**quick))
    ns.typo = _write_yaml(d / "typo.yaml", _recipe(prune={"method": "dpm", "dpm": {"stpes": 4}}, **quick))
    ns.wrong_type = _write_yaml(d / "wrong-type.yaml", _recipe(finetune={"epochs": "ten"}, bench={"backends": []}))
    ns.out_of_range = _write_yaml(d / "range.yaml", _recipe(prune={"method": "oneshot", "target": {"macs": 1.5}},
                                                            **quick))
    ns.bad_enum = _write_yaml(d / "enum.yaml", _recipe(prune={"method": "dmp"}, **quick))
    ns.dup = d / "dup.yaml"
    ns.dup.write_text("name: dup\n"
                      "model: {arch: 'zoo:resnet20', num_classes: 4, in_channels: 1, input_shape: [1, 16, 16]}\n"
                      "finetune:\n"
                      "  epochs: 0\n"
                      "  epochs: 1\n")
    ns.binary = d / "binary.yaml"
    ns.binary.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(64)))
    ns.empty = d / "empty.yaml"
    ns.empty.write_text("")
    ns.as_list = d / "list.yaml"
    ns.as_list.write_text("- name: a\n- name: b\n")
    ns.bad_yaml = d / "invalid.yaml"
    ns.bad_yaml.write_text("name: tiny\nmodel: {arch: zoo:resnet20\nfinetune: {epochs: 0}\n")
    ns.adir = d / "adir"
    ns.adir.mkdir()
    ns.afile = d / "afile.txt"
    ns.afile.write_text("x")

    torch.manual_seed(0)
    model = build_arch("zoo:resnet20", 4, 1)
    ns.whole = d / "whole.pt"
    torch.save(model, ns.whole)
    ns.torchscript = d / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), ns.torchscript)
    ns.wrong_keys = d / "wrong-keys.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, ns.wrong_keys)
    ns.wrong_shapes = d / "wrong-shapes.pt"
    torch.save(build_arch("zoo:resnet20", 10, 1).state_dict(), ns.wrong_shapes)  # fc has 10 outputs, not 4
    ns.garbage = d / "garbage.pt"
    ns.garbage.write_bytes(random.Random(1).randbytes(512))
    from safetensors.torch import save_file

    good = d / "good.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good))
    ns.truncated_st = d / "truncated.safetensors"
    ns.truncated_st.write_bytes(good.read_bytes()[:200])

    from compressor.deploy.export import export_onnx
    from compressor.deploy.config import OnnxConfig

    ns.onnx = d / "ok.onnx"
    export_onnx(model, torch.randn(1, 1, 16, 16), ns.onnx, OnnxConfig(simplify=False))
    (d / "text").mkdir()
    ns.text_onnx = d / "text" / "model.onnx"  # a text file under an ONNX name
    ns.text_onnx.write_text("this is a text file, not a model\n")
    ns.truncated_onnx = d / "truncated.onnx"
    ns.truncated_onnx.write_bytes(ns.onnx.read_bytes()[: ns.onnx.stat().st_size // 2])
    ns.imagefolder = d / "images"  # pictures, but no train/ and val/ folders
    (ns.imagefolder / "cats").mkdir(parents=True)
    ns.empty_classes = d / "empty-classes"  # train/ and val/ with a class folder that holds no image
    for split in ("train", "val"):
        (ns.empty_classes / split / "cat").mkdir(parents=True)
    return ns


@dataclass(frozen=True)
class Row:
    id: str
    args: Callable  # (files, tmp) -> argv
    code: int
    needle: Callable | str  # what stderr must name: a str, or (files, tmp) -> str
    sub: bool = False  # through the real entry point in a subprocess
    skip: Optional[Callable[[], bool]] = None  # when true (e.g. a GPU is present) the row does not apply
    absent: Callable = field(default=lambda f, t: [])  # paths outside tmp that must not exist afterwards
    xfail: Optional[str] = None  # a known defect outside this change's files (strict: passing is reported)


def compress(*extra):
    return lambda f, t: ["compress", *[a(f, t) if callable(a) else a for a in extra], "--out", t / "run"]


def rec(name):
    return lambda f, t: getattr(f, name)


ROWS = [
    # ------------------------------------------------------------------ recipe files
    Row("recipe-typo-key", compress("zoo:resnet20", "--recipe", rec("typo")), 2,
        "prune.dpm.stpes: unknown key (did you mean steps?)"),
    Row("recipe-wrong-type", lambda f, t: ["inspect", "zoo:resnet20", "--recipe", f.wrong_type], 2,
        "finetune.epochs:"),
    Row("recipe-out-of-range", lambda f, t: ["export", "zoo:resnet20", "--recipe", f.out_of_range,
                                             "--out", t / "m.onnx"], 2, "prune.target.macs:"),
    Row("recipe-bad-enum", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.bad_enum], 2,
        "prune.method: 'dmp' is not allowed (did you mean dpm?)"),
    Row("recipe-duplicated-key", compress("zoo:resnet20", "--recipe", rec("dup")), 2,
        "'finetune.epochs' is given twice (lines 4 and 5)", sub=True),
    Row("recipe-duplicated-key-validate", lambda f, t: ["recipes", "validate", f.dup], 2,
        "'finetune.epochs' is given twice"),
    Row("recipe-binary-file", lambda f, t: ["recipes", "validate", f.binary], 2, "binary.yaml is not a text file",
        sub=True),
    Row("recipe-empty-file", lambda f, t: ["recipes", "show", f.empty], 2, "empty.yaml is empty"),
    Row("recipe-yaml-list", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.as_list], 2,
        "list.yaml must be a YAML mapping"),
    Row("recipe-invalid-yaml", lambda f, t: ["inspect", "zoo:resnet20", "--recipe", f.bad_yaml], 2,
        "invalid.yaml is not valid YAML (line"),
    Row("recipe-missing-file", compress("zoo:resnet20", "--recipe", lambda f, t: t / "nope.yaml"), 2,
        "nope.yaml' not found"),
    Row("recipe-is-a-directory", lambda f, t: ["recipes", "validate", f.adir], 2, "adir' is a directory"),
    Row("recipe-unknown-shipped-name", lambda f, t: ["recipes", "show", "resnet20-fmnist-dmp"], 2,
        "'resnet20-fmnist-dmp' not found"),
    Row("recipes-schema-extra-argument", lambda f, t: ["recipes", "schema", "extra"], 2, "extra argument"),
    Row("recipes-validate-no-file", lambda f, t: ["recipes", "validate"], 2, "Missing argument"),
    Row("recipe-needed", lambda f, t: ["eval", "zoo:resnet20"], 2, "needs --recipe"),
    # ------------------------------------------------------------------ --set
    Row("set-without-equals", lambda f, t: ["recipes", "show", f.recipe, "--set", "finetune.epochs"], 2,
        "--set 'finetune.epochs': expected key=value"),
    Row("set-empty-key", lambda f, t: ["recipes", "validate", f.recipe, "--set", "=3"], 2, "the key is empty"),
    Row("set-into-a-scalar", lambda f, t: ["recipes", "show", f.recipe, "--set", "finetune.epochs.max=3"], 2,
        "finetune.epochs is a value"),
    Row("set-unknown-key", compress("zoo:resnet20", "--recipe", rec("recipe"), "--set", "finetune.epoch=3"), 2,
        "finetune.epoch: unknown key (did you mean epochs?)"),
    Row("set-bad-type", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.recipe, "--set", "data.batch_size=many"],
        2, "data.batch_size:"),
    Row("set-duplicated-key-in-value", lambda f, t: ["recipes", "show", f.recipe, "--set",
                                                     "finetune.optimizer={lr: 0.1, lr: 0.2}"], 2, "'lr' appears twice"),
    Row("set-without-recipe", lambda f, t: ["inspect", "zoo:resnet20", "--set", "model.num_classes=4"], 2,
        "needs --recipe"),
    # ------------------------------------------------------------------ checkpoints
    Row("ckpt-missing", lambda f, t: ["eval", t / "missing.pt", "--recipe", f.recipe], 2, "missing.pt' does not exist"),
    Row("ckpt-garbage-bytes", lambda f, t: ["eval", f.garbage, "--recipe", f.recipe], 2,
        "garbage.pt' is not a PyTorch checkpoint", sub=True),
    Row("ckpt-garbage-compress", compress(rec("garbage"), "--recipe", rec("recipe")), 2,
        "garbage.pt' is not a PyTorch checkpoint"),
    Row("ckpt-pickled-module-untrusted", compress(rec("whole"), "--recipe", rec("recipe")), 2, "--trust-checkpoint"),
    Row("ckpt-pickled-module-export", lambda f, t: ["export", f.whole, "--recipe", f.recipe, "--out", t / "m.onnx"], 2,
        "--trust-checkpoint"),
    Row("ckpt-torchscript", lambda f, t: ["inspect", f.torchscript, "--recipe", f.recipe], 2,
        "scripted.pt' is a TorchScript archive"),
    Row("ckpt-wrong-keys", lambda f, t: ["eval", f.wrong_keys, "--recipe", f.recipe], 2,
        "unexpected keys: encoder.weight"),
    Row("ckpt-wrong-shapes", lambda f, t: ["export", f.wrong_shapes, "--recipe", f.recipe], 2,
        "fc.weight: checkpoint (10, 64) vs model (4, 64)",
        absent=lambda f, t: [f.wrong_shapes.with_suffix(".onnx")]),
    Row("ckpt-truncated-safetensors", lambda f, t: ["eval", f.truncated_st, "--recipe", f.recipe], 2,
        "truncated.safetensors' is not a readable safetensors file"),
    Row("ckpt-unknown-scheme", lambda f, t: ["inspect", "foo:bar", "--recipe", f.recipe], 2, "unknown scheme 'foo'"),
    Row("ckpt-unknown-zoo-model", lambda f, t: ["inspect", "zoo:resnet21", "--recipe", f.recipe], 2,
        "unknown zoo model 'resnet21'"),
    # ------------------------------------------------------------------ output paths
    Row("out-is-a-file", lambda f, t: ["compress", "zoo:resnet20", "--recipe", f.recipe, "--out", f.afile], 2,
        "--out", sub=True),
    Row("out-below-a-file", lambda f, t: ["compress", "zoo:resnet20", "--recipe", f.recipe, "--out", f.afile / "run"],
        2, "afile.txt is a file"),
    Row("export-out-is-a-directory", lambda f, t: ["export", "zoo:resnet20", "--recipe", f.recipe, "--out", f.adir], 2,
        "--out"),
    Row("eval-json-is-a-directory", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.recipe, "--json", f.adir], 2,
        "--json"),
    Row("inspect-json-below-a-file", lambda f, t: ["inspect", "zoo:resnet20", "--recipe", f.recipe,
                                                   "--json", f.afile / "i.json"], 2, "--json"),
    Row("bench-json-is-a-directory", lambda f, t: ["bench", f.onnx, "--batch", "1", *FAST, "--json", f.adir], 2,
        "--json"),
    Row("profile-json-below-a-file", lambda f, t: ["profile", f.onnx, "--runs", "1", "--json", f.afile / "p.json"], 2,
        "--json"),
    # ------------------------------------------------------------------ ONNX files
    Row("bench-onnx-is-text", lambda f, t: ["bench", f.text_onnx, "--batch", "1", *FAST], 2, "text/model.onnx",
        sub=True),
    Row("bench-onnx-truncated", lambda f, t: ["bench", f.truncated_onnx, "--batch", "1", *FAST], 2,
        "truncated.onnx"),
    Row("bench-onnx-missing", lambda f, t: ["bench", t / "missing.onnx"], 2, "missing.onnx' does not exist"),
    Row("bench-baseline-is-text", lambda f, t: ["bench", f.onnx, "--baseline", f.text_onnx, "--batch", "1", *FAST], 2,
        "text/model.onnx"),
    Row("bench-checkpoint-on-ort", lambda f, t: ["bench", f.whole, "--backend", "ort-cpu"], 2, "runs .onnx files"),
    Row("bench-torch-needs-shape", lambda f, t: ["bench", f.truncated_st, "--backend", "torch"], 2, "--input-shape"),
    Row("profile-onnx-is-text", lambda f, t: ["profile", f.text_onnx, "--runs", "1"], 2, "text/model.onnx", sub=True),
    Row("profile-onnx-truncated", lambda f, t: ["profile", f.truncated_onnx, "--runs", "1"], 2, "truncated.onnx"),
    Row("profile-onnx-missing", lambda f, t: ["profile", t / "missing.onnx"], 2, "missing.onnx' does not exist"),
    Row("profile-not-onnx", lambda f, t: ["profile", f.whole], 2, "reads ONNX files, not 'whole.pt'"),
    Row("inspect-onnx-is-text", lambda f, t: ["inspect", "--onnx", f.text_onnx], 2, "text/model.onnx"),
    Row("inspect-onnx-truncated", lambda f, t: ["inspect", "--onnx", f.truncated_onnx, "--json", t / "c.json"], 2,
        "truncated.onnx"),
    Row("inspect-onnx-missing", lambda f, t: ["inspect", "--onnx", t / "missing.onnx"], 2, "missing.onnx: no such file"),
    Row("inspect-onnx-is-a-directory", lambda f, t: ["inspect", "--onnx", f.adir], 2, "adir: is a directory"),
    Row("eval-onnx-is-text", lambda f, t: ["eval", f.text_onnx, "--recipe", f.recipe, "--json", t / "m.json"], 2,
        "text/model.onnx"),
    Row("eval-onnx-missing", lambda f, t: ["eval", t / "missing.onnx", "--recipe", f.recipe], 2, "missing.onnx"),
    # ------------------------------------------------------------------ data
    Row("data-root-missing", compress("zoo:resnet20", "--recipe", rec("recipe"), "--set", "data.kind=fashion-mnist",
                                      "--set", lambda f, t: f"data.root={t / 'no-such-folder'}"), 2,
        "no-such-folder"),
    Row("data-imagefolder-without-train-val", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.recipe, "--set",
                                                            "data.kind=imagefolder", "--set",
                                                            f"data.root={f.imagefolder}"], 2, "train/ and val/"),
    Row("data-imagefolder-empty-class", compress("zoo:resnet20", "--recipe", rec("recipe"), "--set",
                                                 "data.kind=imagefolder", "--set",
                                                 lambda f, t: f"data.root={f.empty_classes}"), 2, "cat"),
    Row("data-python-factory-missing", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.recipe, "--set",
                                                     "data.kind=python", "--set", "data.factory=no_such_mod:build"],
        2, "no_such_mod:build"),
    # ------------------------------------------------------------------ batch lists and numbers
    Row("bench-batch-not-a-number", lambda f, t: ["bench", f.onnx, "--batch", "1,x"], 2, "--batch"),
    Row("bench-batch-zero", lambda f, t: ["bench", f.onnx, "--batch", "0"], 2, "--batch"),
    Row("bench-batch-empty", lambda f, t: ["bench", f.onnx, "--batch", ""], 2, "--batch"),
    Row("bench-batch-negative", lambda f, t: ["bench", f.onnx, "--batch", "4,-1"], 2, "--batch"),
    Row("bench-input-shape-bad", lambda f, t: ["bench", f.onnx, "--input-shape", "1,16,x"], 2, "--input-shape"),
    Row("bench-min-runs-zero", lambda f, t: ["bench", f.onnx, "--min-runs", "0"], 2, "--min-runs"),
    Row("export-batch-not-a-number", lambda f, t: ["export", "zoo:resnet20", "--recipe", f.recipe,
                                                   "--out", t / "m.onnx", "--batch", "1,x"], 2, "--batch"),
    Row("profile-batch-zero", lambda f, t: ["profile", f.onnx, "--batch", "0"], 2, "--batch"),
    Row("recipe-batch-sizes-zero", compress("zoo:resnet20", "--recipe", rec("recipe"),
                                            "--set", "bench.batch_sizes=[1, 0]"), 2, "bench.batch_sizes:"),
    Row("export-opset-out-of-range", lambda f, t: ["export", "zoo:resnet20", "--recipe", f.recipe,
                                                   "--out", t / "m.onnx", "--opset", "5"], 2, "--opset 5"),
    Row("export-unknown-format", lambda f, t: ["export", "zoo:resnet20", "--recipe", f.recipe, "--format", "tflite"],
        2, "--format 'tflite'"),
    # ------------------------------------------------------------------ backends and devices
    Row("bench-unknown-backend", lambda f, t: ["bench", f.onnx, "--backend", "ort-gpu"], 2,
        "unknown backend 'ort-gpu' (did you mean ort-cpu?)"),
    Row("recipe-unknown-backend", compress("zoo:resnet20", "--recipe", rec("recipe"), "--set", "bench.backends=[onnx]"),
        2, "bench.backends.0: 'onnx' is not allowed"),
    Row("bench-tensorrt-without-gpu", lambda f, t: ["bench", f.onnx, "--backend", "tensorrt"], 3, "tensorrt",
        skip=_tensorrt),
    Row("bench-ort-cuda-without-gpu", lambda f, t: ["bench", f.onnx, "--backend", "ort-cuda", "--batch", "1", *FAST,
                                                    "--json", t / "b.json"], 3, "CUDAExecutionProvider", skip=_ort_cuda),
    Row("bench-ort-trt-without-gpu", lambda f, t: ["bench", f.onnx, "--backend", "ort-cpu,ort-trt"], 3,
        "TensorrtExecutionProvider", skip=_ort_trt),
    Row("compress-ort-cuda-without-gpu", compress("zoo:resnet20", "--recipe", rec("recipe"),
                                                  "--set", "bench.backends=[ort-cuda]"), 3, "ort-cuda",
        skip=_ort_cuda),
    Row("compress-tensorrt-required-without-gpu", compress("zoo:resnet20", "--recipe", rec("recipe"),
                                                           "--set", "export.tensorrt.enabled=true"), 3,
        "export.tensorrt.enabled", skip=_tensorrt),
    Row("export-tensorrt-without-gpu", lambda f, t: ["export", "zoo:resnet20", "--recipe", f.recipe, "--format",
                                                     "tensorrt", "--out", t / "m.engine"], 3, "--format tensorrt",
        skip=_tensorrt),
    Row("compress-device-cuda-without-gpu", compress("zoo:resnet20", "--recipe", rec("recipe"), "--device", "cuda"), 3,
        "--device cuda", skip=_cuda),
    Row("eval-device-cuda-without-gpu", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.recipe, "--device",
                                                      "cuda:0"], 3, "--device cuda:0", skip=_cuda),
    Row("eval-device-unknown", lambda f, t: ["eval", "zoo:resnet20", "--recipe", f.recipe, "--device", "tpu"], 2,
        "--device 'tpu'"),
    Row("compress-device-unknown", compress("zoo:resnet20", "--recipe", rec("recipe"), "--device", "gpu"), 2,
        "--device 'gpu'"),
]

ROW_IDS = [row.id for row in ROWS]


def test_the_table_covers_every_command():
    assert len(ROWS) >= 45 and len(set(ROW_IDS)) == len(ROWS)
    seen = set()
    for row in ROWS:
        args = [str(a) for a in row.args(SimpleNamespace(**{k: Path(k) for k in _FILE_NAMES}), Path("t"))]
        seen.add(" ".join(args[:2]) if args[0] == "recipes" else args[0])
    assert {"compress", "inspect", "export", "bench", "eval", "profile", "recipes show", "recipes validate",
            "recipes schema"} <= seen
    assert sum(row.sub for row in ROWS) >= 5


_FILE_NAMES = ("recipe", "typo", "wrong_type", "out_of_range", "bad_enum", "dup", "binary", "empty", "as_list",
               "bad_yaml", "adir", "afile", "whole", "torchscript", "wrong_keys", "wrong_shapes", "garbage",
               "truncated_st", "onnx", "text_onnx", "truncated_onnx", "imagefolder", "empty_classes")


def _left_behind(tmp: Path) -> list[Path]:
    """Files a failed command left in its scratch folder, except a run's recipe.yaml (which does not look like a
    finished run: no report, no model)."""
    return [p for p in tmp.rglob("*") if p.is_file() and p != tmp / "run" / "recipe.yaml"]


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_bad_input(row: Row, f, tmp_path, request):
    if row.skip is not None and row.skip():
        pytest.skip("this machine has the GPU/backend the row expects to be missing")
    if row.xfail:
        request.applymarker(pytest.mark.xfail(reason=row.xfail, strict=True))
    args = row.args(f, tmp_path)
    before = f.afile.read_text()
    result = run_cli(*args, cwd=tmp_path) if row.sub else invoke_cli(*args)
    stderr = result.stderr
    assert result.returncode == row.code, f"exit {result.returncode}, want {row.code}:\n{stderr}"
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    needle = row.needle(f, tmp_path) if callable(row.needle) else row.needle
    assert needle in stderr, f"{needle!r} not in:\n{stderr}"
    assert not _left_behind(tmp_path), _left_behind(tmp_path)
    assert not any(p.exists() for p in row.absent(f, tmp_path))
    assert f.afile.read_text() == before  # the file given as --out is not touched
    if row.sub:  # on a real terminal: one paragraph, nothing else (no library log lines)
        assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr


# ---------------------------------------------------------------------------------------------- --debug, internal errors
def test_debug_shows_the_chained_cause(f):
    result = run_cli("--debug", "recipes", "validate", f.binary)
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "UnicodeDecodeError" in result.stderr
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert "RecipeError" in result.stderr


def test_debug_keeps_the_cause_of_a_wrapped_checkpoint_error(f):
    from compressor.errors import ModelLoadError
    from typer.testing import CliRunner

    from compressor.app.cli import app

    result = CliRunner().invoke(app, ["--debug", "eval", str(f.garbage), "--recipe", str(f.recipe)])
    assert isinstance(result.exception, ModelLoadError) and "garbage.pt" in str(result.exception)
    assert isinstance(result.exception.__cause__, pickle.UnpicklingError)  # `raise ... from exc`, not `from None`


def test_unexpected_exception_is_one_paragraph_and_exit_1(f, monkeypatch):
    import compressor.app.evaluation

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA kernel went sideways\nsecond line of detail")

    monkeypatch.setattr(compressor.app.evaluation, "evaluate_artifact", boom)
    result = invoke_cli("eval", "zoo:resnet20", "--recipe", f.recipe)
    assert result.returncode == 1
    assert "internal error: RuntimeError: CUDA kernel went sideways" in result.stderr
    assert "rerun with --debug" in result.stderr and "report it" in result.stderr
    assert "Traceback" not in result.stderr and "second line" not in result.stderr
    from typer.testing import CliRunner

    from compressor.app.cli import app

    debug = CliRunner().invoke(app, ["--debug", "eval", "zoo:resnet20", "--recipe", str(f.recipe)])
    assert isinstance(debug.exception, RuntimeError) and "sideways" in str(debug.exception)


BROKEN_MODEL = '''
import torch
from torch import nn


class Broken(nn.Module):
    def __init__(self, batched_only):
        super().__init__()
        self.conv, self.batched_only = nn.Conv2d(1, 4, 3), batched_only

    def forward(self, x):
        out = self.conv(x).mean((2, 3))
        if len(x) > 1 or not self.batched_only:
            out = out @ torch.ones(5, 4)  # wrong shapes: a RuntimeError deep in torch
        return out


def build(num_classes=4, in_channels=1):
    return Broken(batched_only=False)


def build_batched(num_classes=4, in_channels=1):
    return Broken(batched_only=True)
'''


def test_a_model_that_fails_on_the_input_shape_is_a_model_error(tmp_path, monkeypatch):
    """It was an "internal error ... likely a bug in compressor" (exit 1) at the first evaluation."""
    (tmp_path / "broken_model.py").write_text(BROKEN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_model", raising=False)  # this test's file, not another test's
    recipe = _write_yaml(tmp_path / "r.yaml", _recipe(model={"arch": "python:broken_model:build"}))
    result = invoke_cli("compress", "python:broken_model:build", "--recipe", recipe, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert ("model error: python:broken_model:build fails on one input of model.input_shape [1, 16, 16] (model.inputs "
            "image): RuntimeError: mat1 and mat2 shapes cannot be multiplied") in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_checkpoint_with_nan_or_inf_weights_is_refused_at_load_naming_the_tensors(tmp_path):
    """Training started and stopped with "the training loss became nan ... lower finetune.optimizer.lr"."""
    state = build_arch("zoo:resnet20", 4, 1).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, :2] = float("nan")
    state["bn1.running_var"][3] = float("-inf")
    torch.save(state, tmp_path / "diverged.pt")
    recipe = _write_yaml(tmp_path / "r.yaml", _recipe(finetune={"epochs": 1}))
    result = invoke_cli("compress", tmp_path / "diverged.pt", "--recipe", recipe, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert ("2 weight tensor(s) hold NaN or infinite values: bn1.running_var (0 NaN, 1 infinite of 16); "
            "layer2.0.conv1.weight (2 NaN, 0 infinite of 4608).") in " ".join(result.stderr.split())
    assert "training stopped" not in result.stderr and "loss became nan" not in result.stderr


def test_unexpected_exception_through_the_entry_point(tmp_path):
    """A model that runs on the load check's single input and fails on the evaluation's batches: the CLI's safety
    net, one paragraph without a traceback (with one under --debug)."""
    (tmp_path / "broken_model.py").write_text(BROKEN_MODEL)
    recipe = _write_yaml(tmp_path / "r.yaml", _recipe(model={"arch": "python:broken_model:build_batched"}))
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}"}
    result = run_cli("eval", "python:broken_model:build_batched", "--recipe", recipe, env=env)
    assert result.returncode == 1, result.stderr
    assert "internal error: RuntimeError:" in result.stderr and "--debug" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_cli("--debug", "eval", "python:broken_model:build_batched", "--recipe", recipe, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "broken_model.py" in debug.stderr


# ---------------------------------------------------------------------------------------------- unit checks
def test_onnxslim_absent_and_failing_are_told_apart(tmp_path, monkeypatch):
    import onnxslim

    from compressor.deploy.export import export_onnx
    from compressor.deploy.config import OnnxConfig

    model, example = build_arch("zoo:resnet20", 4, 1), torch.randn(1, 1, 16, 16)

    def crash(*args, **kwargs):
        raise ValueError("unsupported node Foo")

    monkeypatch.setattr(onnxslim, "slim", crash)
    info = export_onnx(model, example, tmp_path / "a.onnx", OnnxConfig())
    assert not info["simplified"] and (tmp_path / "a.onnx").is_file()
    assert "ValueError: unsupported node Foo" in info["simplify_note"] and "unsimplified" in info["simplify_note"]
    assert "not installed" not in info["simplify_note"]

    monkeypatch.setitem(sys.modules, "onnxslim", None)  # import onnxslim -> ImportError
    info = export_onnx(model, example, tmp_path / "b.onnx", OnnxConfig())
    assert not info["simplified"] and "onnxslim not installed" in info["simplify_note"]


def test_a_run_folder_that_never_started_is_reused(tmp_path):
    from compressor.app.pipeline import prepare_run_dir
    from compressor.app.recipe import recipe_from_dict

    recipe = recipe_from_dict(_recipe())
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("name: an-earlier-attempt\n")  # all a failed compress leaves behind
    assert prepare_run_dir(out, recipe, resume=False, overwrite=False) == out
    (out / "checkpoints").mkdir()
    with pytest.raises(UsageError, match="already holds a run"):
        prepare_run_dir(out, recipe, resume=False, overwrite=False)
    with pytest.raises(UsageError, match="--out .* is a file"):
        prepare_run_dir(out / "recipe.yaml", recipe, resume=False, overwrite=False)


def test_recipe_errors_keep_their_cause(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\xfa")
    from compressor.app.recipe import load_recipe

    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert isinstance(info.value.__cause__, UnicodeDecodeError)
