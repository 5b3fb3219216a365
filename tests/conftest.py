"""Shared test helpers: run the real CLI entry point, tiny recipes on synthetic data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m compressor ARGS` (the same entry point as the console script) and capture its output."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_recipe(**sections) -> dict:
    """A recipe dict for a small zoo model on synthetic 1x16x16 data; sections override the defaults."""
    recipe = {
        "name": "tiny",
        "model": {"arch": "zoo:resnet20", "num_classes": 4, "in_channels": 1, "input_shape": [1, 16, 16]},
        "data": {"kind": "synthetic", "batch_size": 32, "synthetic": {"train_size": 128, "val_size": 64}},
        "prune": {"method": "none"},
        "finetune": {"epochs": 2, "optimizer": {"lr": 0.05}},
        # the recipe's backends and batches, timed briefly: the tests check what is measured, not how fast
        "bench": {"warmup_ms": 20, "min_runs": 5, "min_seconds": 0.1},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


requires_fmnist = pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                     reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def invoke_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in this process (typer's CliRunner on the same app the entry point runs): much faster than
    run_cli for many small error cases. Returns a CompletedProcess like run_cli; an exception that escaped the
    app is appended to stderr as the traceback a terminal would have shown."""
    import traceback

    from typer.testing import CliRunner

    from compressor.app.cli import app

    argv = [str(a) for a in args]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200", **(env or {})})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, stderr)
