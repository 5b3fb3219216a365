"""Batch-norm recalibration on the sample (issue: recovery that costs nothing): the quickstart recipe (DPM around
DepGraph, macs 0.5) with 0 and 1 fine-tune epochs, top-1 on the 10,000 Fashion-MNIST test images before and after
finetune.bn_recalibration, on the same pruned model (the run trains with recalibration off, is evaluated, then
recalibrated as `compress` does and evaluated again). Also the one-shot host baseline without fine-tuning.

    python benchmarks/bn_recalibration.py [--seeds 0 1 2]

Rows are kept in results/bn_recalibration.json (a finished row is not run again) and rendered to
results/bn_recalibration.md. round_to is fixed at 16 (what `round_to: auto` chose for this model on both CPUs
measured so far), so the rows do not depend on a latency measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date

import torch

from compressor.app.recipe import load_recipe
from compressor.models.loading import load_model
from compressor.prune.methods import METHODS
from compressor.train.bn_recalibration import recalibrate_batch_norm
from compressor.train.data import build_datasets
from compressor.train.loop import _calibration_batches, evaluate, fit

from common import RESULTS, cpu_label, table, write_result

SAMPLE, RECIPE = "samples/resnet20-fmnist.safetensors", "recipes/resnet20-fmnist-dpm.yaml"
STORE = RESULTS / "bn_recalibration.json"


def run(method: str, epochs: int, seed: int) -> dict:
    recipe = load_recipe(RECIPE, [f"prune.method={method}", "prune.round_to=16", f"finetune.epochs={epochs}",
                                  f"finetune.seed={seed}", "finetune.bn_recalibration.enabled=false",
                                  f"prune.schedule.end_epoch={min(1, epochs)}"])
    model = load_model(SAMPLE, recipe.model)
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    start = time.perf_counter()
    fit(model, train_set, val_set, recipe.finetune, recipe.data, method=METHODS.get(method)(recipe.prune_spec()),
        evaluate_every_epoch=False)
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    before = evaluate(model, val_set, batch_size=512)["top1"]
    batches = recipe.finetune.bn_recalibration.batches
    cal_start = time.perf_counter()
    done = recalibrate_batch_norm(model, _calibration_batches(train_set, recipe.data.batch_size, batches),
                                  torch.device("cpu"))
    cal_s = time.perf_counter() - cal_start
    after = evaluate(model, val_set, batch_size=512)["top1"]
    params = sum(p.numel() for p in model.parameters())
    return {"method": method, "epochs": epochs, "seed": seed, "before": before, "after": after,
            "samples": done["samples"], "layers": done["layers"], "recalibration_s": cal_s, "params": params,
            "wall_s": time.perf_counter() - start, "cpu": cpu_label(), "date": date.today().isoformat()}


def render(rows: list[dict]) -> str:
    out = ["# Batch-norm recalibration on the sample", "",
           "`python benchmarks/bn_recalibration.py`: the sample ResNet-20 (dense top-1 93.42%) pruned to macs 0.5 "
           "(round_to 16) with the quickstart recipe's DPM, or the one-shot host baseline, and 0 or 1 fine-tune "
           "epochs; top-1 on the 10,000 test images of the same pruned model before and after re-estimating the "
           "batch-norm statistics on 32 training batches of 128 (finetune.bn_recalibration, on by default).", ""]
    body = []
    for key in sorted({(r["method"], r["epochs"]) for r in rows}):
        group = [r for r in rows if (r["method"], r["epochs"]) == key]
        gain = [r["after"] - r["before"] for r in group]
        fmt = (lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}")
        body.append([key[0], key[1], ", ".join(str(r["seed"]) for r in group), fmt([r["before"] for r in group]),
                     fmt([r["after"] for r in group]), f"{statistics.mean(gain):+.2f}",
                     f"{statistics.mean(r['recalibration_s'] for r in group):.1f}"])
    out.append(table(["method", "fine-tune epochs", "seeds", "top-1 before %", "top-1 after %", "gain pp",
                      "recalibration s"], body))
    out += ["Per run:", ""]
    out.append(table(["method", "epochs", "seed", "before %", "after %", "CPU", "date"],
                     [[r["method"], r["epochs"], r["seed"], f"{r['before']:.2f}", f"{r['after']:.2f}", r["cpu"],
                       r["date"]] for r in rows]))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = json.loads(STORE.read_text()) if STORE.is_file() else []
    plan = [("dpm", 0, 0), ("oneshot", 0, 0)] + [("dpm", 1, s) for s in args.seeds]  # 0 epochs: nothing is random
    for method, epochs, seed in plan:
        if any((r["method"], r["epochs"], r["seed"]) == (method, epochs, seed) for r in rows):
            continue
        rows.append(run(method, epochs, seed))
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps(rows, indent=2) + "\n")
        write_result("bn_recalibration.md", render(rows))


if __name__ == "__main__":
    main()
