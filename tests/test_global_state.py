"""Importing compressor and using it as a library leaves the process's global state as it was: RNG states and seeds,
torch's thread counts, the matplotlib backend and pyplot's figures, the root logger, the warnings filters,
torch-pruning's op-counter mapping and pruning function, the SIGALRM handler and timer. Run in a fresh interpreter,
where nothing else has imported the modules yet.

The training frameworks the callbacks adapt (Lightning, transformers' Trainer) are imported before the first look:
their own imports add warnings filters (and Lightning imports pyplot), which a process that uses those callbacks
has done anyway; what compressor's modules do on top of them is checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import importlib, importlib.util, json, logging, pickle, pkgutil, random, signal, sys, warnings
from pathlib import Path

import matplotlib
matplotlib.use("svg")  # a backend the library has no reason to pick: any switch shows
import numpy as np
import torch
import torch_pruning as tp  # noqa: F401
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc
from torch_pruning.utils import op_counter

for framework in ("lightning.pytorch", "transformers", "accelerate"):  # see the module docstring
    if importlib.util.find_spec(framework.split(".")[0]) is not None:
        importlib.import_module(framework)
out = Path(sys.argv[1])
torch.set_num_threads(2)  # differ from anything a library default would set
torch.set_num_interop_threads(3)
logging.getLogger().setLevel(logging.WARNING)


class Custom(nn.Module):  # a layer of the user's, counted by a hook the user registered with torch-pruning
    def forward(self, x):
        return x


def custom_hook(module, inputs, output):
    module.__flops__ += 1000


user_mapping = {Custom: custom_hook}
op_counter.CUSTOM_MODULES_MAPPING = user_mapping


def user_alarm(signum, frame):
    raise SystemExit("the user's timer fired")


signal.signal(signal.SIGALRM, user_alarm)
signal.setitimer(signal.ITIMER_REAL, 3600.0)  # the user's own timer, still running after every call


def state():
    return {
        "torch_rng": bytes(torch.get_rng_state().numpy()),
        "initial_seed": torch.initial_seed(),
        "numpy_rng": pickle.dumps(np.random.get_state()),
        "python_rng": random.getstate(),
        "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "matplotlib_backend": matplotlib.get_backend(),
        "pyplot_figures": sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else None,
        "root_logger": (logging.getLogger().level, list(logging.getLogger().handlers), logging.root.manager.disable),
        "warnings_filters": [tuple(getattr(f, "pattern", f) for f in entry) for entry in warnings.filters],
        "op_counter_custom": (op_counter.CUSTOM_MODULES_MAPPING is user_mapping, dict(user_mapping)),
        "op_counter_known": dict(op_counter.MODULES_MAPPING),
        "pruning_function": BasePruningFunc.__dict__["_prune_parameter_and_grad"],
        "torch_flags": (torch.get_default_dtype(), torch.is_grad_enabled(), torch.backends.mha.get_fastpath_enabled()),
        "alarm": (signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)[0] > 3000),
    }


def changed(before, after):
    return sorted(k for k in before if before[k] != after[k])


report = {}
initial = state()
import compressor
modules = [m.name for m in pkgutil.walk_packages(compressor.__path__, "compressor.") if m.name != "compressor.__main__"]
for name in modules:
    importlib.import_module(name)
report["modules"] = len(modules)
report["after_import"] = changed(initial, state())


class StdConv(nn.Conv2d):  # a subclass of a layer torch-pruning knows: count_ops adds a hook for it
    def forward(self, x):
        return super().forward(x)


from compressor.app.report import write_plots
from compressor.prune.importance import ImportanceConfig, build_scorer
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import Constraints, plan_for_macs
from compressor.prune.removal import remove
from compressor.prune.snapshot import snapshot

model = nn.Sequential(StdConv(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Custom(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
before = state()  # the model is the user's: building it draws from torch's generator
report["dense_macs"] = snapshot_macs(model, x)[0]
report["stdconv_macs"] = snapshot_macs(model[0], x)[0]
report["custom_macs"] = snapshot_macs(Custom(), x)[0]
snap = snapshot(model, x, [], build_scorer(ImportanceConfig(kind="magnitude")))
plan = plan_for_macs(snap, 0.5 * snap.total_macs, Constraints(round_to=4))
report["removed"] = remove(model, x, plan)
report["pruned_macs"] = snapshot_macs(model, x)[0]
widths = {"0": 16, "4": 16}
report["plots"] = sorted(write_plots({
    "recipe": {"prune": {"method": "dpm"}},
    "dense": {"widths": widths, "top1": 90.0},
    "compressed": {"widths": {"0": model[0].out_channels, "4": model[4].out_channels}},
    "training": {"history": [{"epoch": 0, "train_loss": 1.0, "val_top1": 80.0},
                             {"epoch": 1, "train_loss": 0.5, "val_top1": 85.0}]},
    "method": {"decay_trace": [{"steps": [0, 1, 2], "norms": [1.0, 0.5, 0.1], "outcome": "removed"}]},
    "latency": [{"backend": "ort-cpu", "batch_size": 1, "dense_ms": [1.0, 1.2, 1.1], "compressed_ms": [0.5, 0.6, 0.5],
                 "speedup": 2.0}],
}, out))
report["after_use"] = changed(before, state())
print(json.dumps(report))
'''


def test_importing_and_using_the_library_changes_no_global_state(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MPLBACKEND", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["modules"] > 50  # every module of the package was imported
    assert report["after_import"] == []
    assert report["after_use"] == []
    # the path ran: the conv subclass and the user's own hook were counted, channels were removed, plots were drawn
    assert report["stdconv_macs"] == 3 * 16 * 9 * 64
    assert report["custom_macs"] == 1000
    assert report["removed"] > 0 and report["pruned_macs"] < 0.7 * report["dense_macs"]
    assert report["plots"] == ["decay", "latency", "training", "widths"]
    assert all((tmp_path / f"plot_{name}.png").stat().st_size > 1000 for name in report["plots"])
