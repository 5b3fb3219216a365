"""Time and peak memory of inspect + prune + slim + export for large torchvision models at 224 on this machine.

    python benchmarks/scale.py [--models resnet50 vit_b_16] [--macs 0.5]

Each model runs in its own process (peak RSS is that process's maximum resident set): `compressor inspect` (groups
and the predicted plan), then `compressor compress` with no fine-tuning on synthetic data, whose stage timers give
load, prune (dependency graph, importance, selection, removal), export (slim save + ONNX of the compressed and
the dense model) and verify. Goals from issue #8: ResNet-50 <= 30 s and <= 3 GB, ViT-B/16 <= 60 s.
Writes benchmarks/results/scale.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import input_size, table, write_result, zoo_overrides

GOALS = {"resnet50": (30.0, 3.0), "vit_b_16": (60.0, None)}


def one(name: str, macs: float, out: Path) -> dict:
    import torch

    from compressor.app.inspection import inspect_checkpoint
    from compressor.app.pipeline import compress
    from compressor.app.recipe import load_recipe

    torch.set_num_threads(2)
    size = input_size(name)
    recipe = load_recipe("resnet50-imagenet-latency", zoo_overrides(name, size, macs) + ["bench.backends=[]"])
    start = time.perf_counter()
    groups = len(inspect_checkpoint(f"torchvision:{name}", recipe).groups)
    inspect_s = time.perf_counter() - start
    report = compress(f"torchvision:{name}", recipe, out / name, overwrite=True)
    t = report["timings_s"]
    return {"model": name, "input": size, "groups": groups, "inspect": inspect_s, "load": t["load"],
            "prune": t["prune_finetune"], "export": t["export"], "verify": t["verify"],
            "macs_kept": report["compressed"]["macs"] / report["dense"]["macs"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(GOALS))
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args.macs, args.out)), flush=True)
        return
    rows = []
    for name in args.models:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", name, "--macs", str(args.macs), "--out",
                               str(args.out)], capture_output=True, text=True)
        wall = time.perf_counter() - start
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if not lines:
            raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        r = json.loads(lines[-1][4:])
        work = r["inspect"] + r["load"] + r["prune"] + r["export"]
        goal_s, goal_gb = GOALS.get(name, (None, None))
        verdict = [f"{'met' if work <= goal_s else 'NOT met'} (<= {goal_s:.0f} s)" if goal_s else "-",
                   f"{'met' if r['peak_rss_gb'] <= goal_gb else 'NOT met'} (<= {goal_gb:.0f} GB)" if goal_gb else "-"]
        rows.append([name, r["input"], r["groups"], f"{r['macs_kept']:.3f}", f"{r['inspect']:.1f}", f"{r['load']:.1f}",
                     f"{r['prune']:.1f}", f"{r['export']:.1f}", f"{work:.1f}", f"{r['verify']:.1f}", f"{wall:.1f}",
                     f"{r['peak_rss_gb']:.2f}", *verdict])
        print(rows[-1], flush=True)
    text = (f"# Scale: inspect + prune + slim + export at 224 (macs {args.macs}, no fine-tuning)\n\n"
            f"`python benchmarks/scale.py --models {' '.join(args.models)}` on this machine (2 CPU cores, torch 2 "
            "threads). Seconds per stage; `work` = inspect + load + prune + export (the issue's inspect + prune + "
            "slim + export; export includes saving the slim model and exporting both the compressed and the dense "
            "ONNX); `process` = the whole child process including Python and torch imports; peak RSS of that "
            "process.\n\n"
            + table(["model", "input", "groups", "MACs kept", "inspect s", "load s", "prune s", "export s", "work s",
                     "verify s", "process s", "peak RSS GB", "time goal", "memory goal"], rows))
    write_result("scale.md", text)


if __name__ == "__main__":
    main()
