"""Shared test helpers: run the real CLI entry point (or the app in-process), tiny recipes on synthetic data, and
the session's one two-rank torchrun launch (the `ddp` mark and fixture)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# rich sizes a console it creates from COLUMNS: wide enough that table cells the tests read are never truncated,
# whichever test first creates one in this process
os.environ["COLUMNS"] = "200"
if os.environ.get("PYTEST_XDIST_WORKER"):  # tests/run.sh runs one worker per core: one thread each, not oversubscribed
    os.environ["OMP_NUM_THREADS"] = "1"  # the CLI subprocesses and torchrun ranks the tests start inherit it
    import torch

    torch.set_num_threads(1)

# files whose tests share a session fixture's expensive run go to one xdist worker together (else each worker that
# gets one of them would run it again)
SHARED_GROUPS = {"tests.test_nms_export": "task_runs", "tests.test_task_cli": "task_runs",
                 "tests.test_task_report": "task_runs"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's --dist loadgroup (tests/run.sh), every test file is one group, so its module-scoped
    fixtures are built once, and the files in SHARED_GROUPS share one. Without xdist the marks do nothing."""
    def module(item) -> str:
        return item.module.__name__ if item.module is not None else item.nodeid.split("::")[0]

    # the session's one torchrun launch runs every `ddp` case of the session in the worker that first asks for it:
    # the files holding such cases share a worker, or each worker would launch all of them again
    groups = {**SHARED_GROUPS, **{module(i): "ddp" for i in items if i.get_closest_marker("ddp") is not None}}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(groups.get(module(item), module(item))))


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


# ---------------------------------------------------------------------------------------------- two-rank runs
def pytest_configure(config):
    config.addinivalue_line("markers", "ddp(*case): the test reads this two-rank case from the session's one "
                                       "torchrun launch (the `ddp` fixture; tests/ddp_worker.py's arguments)")


class DDPLaunch:
    """One `torchrun --nproc_per_node 2` of tests/ddp_worker.py for every DDP case the session selected: each
    launch costs two interpreters importing torch and a gloo rendezvous, so the cases share one."""

    def __init__(self, root: Path, cases: list[tuple[str, ...]], result: subprocess.CompletedProcess | str) -> None:
        self.root, self.cases, self.result = root, cases, result

    def ranks(self, case: tuple[str, ...]) -> tuple[Path, list[dict]]:
        """The case's directory and its ranks' facts; a failed case fails its test with the ranks' tracebacks."""
        import json

        out = self.root / f"case{self.cases.index(case)}"
        if (out / "ranks.json").is_file():
            return out, json.loads((out / "ranks.json").read_text())
        errors = "".join(p.read_text() for p in sorted(out.glob("error-rank*.txt")))
        if not errors:
            failed = [self.cases[int(p.parent.name[4:])] for p in self.root.glob("case*/error-rank0.txt")]
            errors = f"(none: it did not run{f'; case {failed[0]} failed before it' if failed else ''})"
        launch = (self.result if isinstance(self.result, str)
                  else f"exit {self.result.returncode}:\n{self.result.stderr[-3000:]}")
        pytest.fail(f"two-rank case {case} has no result. Its ranks' errors:\n{errors}\nlaunch: {launch}",
                    pytrace=False)


@pytest.fixture(scope="session")
def ddp_launch(request, tmp_path_factory) -> DDPLaunch:
    """The cases of every selected test with a `ddp` mark, run once, in order, under one torchrun."""
    import json

    cases = list(dict.fromkeys(tuple(m.args) for item in request.session.items for m in item.iter_markers("ddp")))
    root = tmp_path_factory.mktemp("ddp")
    (root / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), str(root), "--cases", str(root / "cases.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300 + 120 * len(cases))
    except subprocess.TimeoutExpired as exc:
        result = f"timed out after {exc.timeout} s"
    return DDPLaunch(root, cases, result)


@pytest.fixture
def ddp(request, ddp_launch) -> tuple[Path, list[dict]]:
    """This test's two-rank case (its `ddp` mark) from the session's launch: (its directory, the ranks' facts)."""
    return ddp_launch.ranks(tuple(request.node.get_closest_marker("ddp").args))


# ---------------------------------------------------------------------------------------------- shared task runs
from tests.task_runs import task_run, task_scenes  # noqa: E402,F401  (one compress per detector / segmenter)
