"""Run under `torchrun --nproc_per_node 2` (tests/conftest.py's ddp_launch): every DDP case of the test session in
one launch, each in its own directory, reporting per-rank facts in that directory's ranks.json."""
from __future__ import annotations

import hashlib
import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from compressor import rundir

from compressor.train import loop as train
from compressor.train.data import build_datasets
from compressor.models.loading import build_arch
from compressor.app.recipe import recipe_from_dict
from tests.conftest import tiny_recipe
from tests.method_settings import invariant_recipe


def compress_run(out_dir: Path) -> None:
    """`compress` under two ranks with round_to: auto (its candidates built for real and timed by a counted
    stand-in: every candidate 1 ms, so the finest, 1, is chosen) and then a latency target's loop (a counted
    stand-in): rank 0 measures and writes, rank 1 adopts. Writes ranks.json with each rank's counts."""
    from compressor.deploy import timing
    from compressor.prune import latency_target as lt

    timed, loops, written = [], [], []
    original_rr, original_write = timing.measure_round_robin, rundir.write_text
    original_loop = lt.measure_latency_target

    def counting_rr(runners, *args, **kwargs):
        timed.append(1)
        return [[1e-3] * 10 for _ in runners]

    def canned_loop(model, recipe, *args):
        loops.append(1)
        return {"asked_speedup": 1.5, "backend": "ort-cpu", "batch": 1, "macs": 0.6, "measured_speedup": 1.5,
                "met": True, "tolerance": 0.05, "tries": [{"macs": 0.6, "speedup": 1.5}]}

    def recording_write(path, text):
        written.append(Path(path).name)
        return original_write(path, text)

    timing.measure_round_robin, lt.measure_latency_target, rundir.write_text = counting_rr, canned_loop, recording_write
    try:
        _compress_facts(out_dir, timed, loops, written)
    finally:  # the cases after this one run with the real functions
        timing.measure_round_robin, lt.measure_latency_target, rundir.write_text = original_rr, original_loop, original_write


def _compress_facts(out_dir: Path, timed: list, loops: list, written: list) -> None:
    from compressor.app import pipeline
    from compressor.prune import latency_target as lt

    recipe = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"macs": 0.5}, "round_to": "auto"},
                                          finetune={"epochs": 1}, bench={"backends": []}))
    report = pipeline.compress("zoo:resnet20", recipe, out_dir / "run")
    latency = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"latency_speedup": 1.5}}))
    torch.manual_seed(0)
    model = build_arch(latency.model.arch, latency.model.num_classes, latency.model.in_channels)
    (out_dir / "loop").mkdir(exist_ok=True)
    resolved, record = lt.resolve_latency_target(latency, model, out=out_dir / "loop")
    facts = {"rank": dist.get_rank(), "timed": len(timed), "loops": len(loops), "written": written,
             "round_to": report.get("round_to", {}).get("value"), "loop_macs": resolved.prune.target.macs,
             "record_macs": record["macs"], "status": report.get("status")}
    _gather(out_dir, facts)


def _gather(out_dir: Path, facts: dict) -> None:
    """Every rank's facts into out_dir/ranks.json (rank 0 writes), then a barrier: both ranks are done
    communicating before the next case (gloo aborted a rank that tore down mid-exchange, CI, once)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    if dist.get_rank() == 0:
        (out_dir / "ranks.json").write_text(json.dumps(gathered))
    dist.barrier()


def qat_run(out_dir: Path) -> None:
    """`compressor compress` (the CLI's Typer app, as `torchrun -m compressor` runs it) with quantization-aware
    fine-tuning under two ranks: QAT runs after the DDP stages on rank 0 by itself (fit(..., alone=True)), so no
    collective waits for the rank that has finished. Each rank's exit code; the test reads rank 0's report."""
    from compressor.app.cli import app

    recipe = tiny_recipe(finetune={"epochs": 1}, bench={"backends": []},
                         export={"quantize": {"mode": "int8", "calibration": {"samples": 32},
                                              "qat": {"enabled": True, "epochs": 1}}},
                         verify={"int8_min_top1_agreement": 0.5})
    (out_dir / "r.yaml").write_text(json.dumps(recipe))
    code = app(["compress", "zoo:resnet20", "--recipe", str(out_dir / "r.yaml"), "--out", str(out_dir / "run")],
               standalone_mode=False)
    _gather(out_dir, {"rank": dist.get_rank(), "exit": code or 0})


def main(out_dir: Path, method_name: str = "none", mode: str = "", *extra: str) -> None:
    if method_name == "compress":
        return compress_run(out_dir)
    if method_name == "qat":
        return qat_run(out_dir)
    writes = []
    original = rundir.save_torch

    def recording_save(obj, path):
        writes.append(str(path))
        return original(obj, path)

    rundir.save_torch = recording_save
    try:
        _train_case(out_dir, method_name, mode, extra, writes)
    finally:
        rundir.save_torch = original


def _train_case(out_dir: Path, method_name: str, mode: str, extra: tuple, writes: list) -> None:
    if mode == "invariant":  # the recipe of test_method_invariants.py
        recipe = recipe_from_dict(invariant_recipe(method_name, *extra))
    elif mode == "heads":  # DPM deciding on attention heads and MLP channels of a tiny ViT
        recipe = recipe_from_dict(tiny_recipe(
            model={"arch": "python:tests.helpers_models:tiny_vit4", "num_classes": 4, "in_channels": 3,
                   "input_shape": [3, 32, 32]},
            prune={"method": method_name, "target": {"macs": 0.5}, "attention": {"heads": True},
                   "schedule": {"events": 2, "end_epoch": 1},
                   "dpm": {"steps": 3, "interval": 1, "t_rate": 0.0, "t_len": 0.0}},
            finetune={"epochs": 2}))
    else:
        prune = {"method": method_name}
        if method_name == "dpm":  # thresholds at zero: any escape releases, so releases and backfills happen
            prune.update(target={"macs": 0.5}, schedule={"events": 2, "end_epoch": 1},
                         dpm={"steps": 3, "interval": 1, "t_rate": 0.0, "t_len": 0.0})
        recipe = recipe_from_dict(tiny_recipe(finetune={"epochs": 2}, prune=prune))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    from compressor.prune.methods import METHODS

    method = METHODS.get(method_name)(recipe.prune_spec()) if method_name != "none" or mode else None
    result = train.fit(model, train_set, val_set, recipe.finetune, recipe.data, checkpoint=out_dir / "ckpt.pt",
                       method=method)
    digest = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes()
                                     for t in model.state_dict().values())).hexdigest()
    facts = {"rank": dist.get_rank(), "world": dist.get_world_size(), "digest": digest, "writes": writes,
             "val_top1": result.final["val_top1"],
             "decisions": method.summary() if method is not None else None,
             "widths": {n: list(p.shape) for n, p in model.state_dict().items()}}
    _gather(out_dir, facts)


def run_cases(root: Path, cases: list[list[str]]) -> None:
    """Each case (main's arguments) in root/case<i>, in order, in this one process group. A case that raises
    leaves its traceback in root/case<i>/error-rank<r>.txt and ends the launch (torchrun then stops the other
    rank, which may be waiting in a collective): the later cases have no ranks.json and their tests say so."""
    for i, case in enumerate(cases):
        out = root / f"case{i}"
        out.mkdir(exist_ok=True)
        try:
            main(out, *case)
        except BaseException:
            (out / f"error-rank{dist.get_rank()}.txt").write_text(traceback.format_exc())
            raise


if __name__ == "__main__":
    # a generous timeout for rank 1's waits (rank 0 times round_to candidates alone), short of the tests' own
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    if sys.argv[2:3] == ["--cases"]:  # ddp_worker.py ROOT --cases CASES.json: a list of main's argument lists
        run_cases(Path(sys.argv[1]), json.loads(Path(sys.argv[3]).read_text()))
    else:  # ddp_worker.py OUT [METHOD [MODE [EXTRA...]]]: one case
        main(Path(sys.argv[1]), *sys.argv[2:])
    dist.barrier()
    dist.destroy_process_group()
