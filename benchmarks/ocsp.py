"""OCSP one-cycle from scratch vs dense training followed by a DPM fine-tune, at the same total epoch budget.

    python benchmarks/ocsp.py [--epochs 15] [--finetune 3] [--train-subset N]

One-cycle: `zoo:resnet20` trained from scratch with the OCSP recipe for --epochs. Baseline: dense training for
(epochs - finetune) epochs (samples/train_sample.py's recipe), then DPM to macs 0.5 for --finetune epochs.
Reports top-1 (full 10k test set), MACs, total training time and the stable epoch OCSP found.
Writes benchmarks/results/ocsp.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import run_compress, table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--finetune", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ocsp"))
    args = parser.parse_args()
    common = ["bench.backends=[ort-cpu]", "bench.batch_sizes=[1]", "bench.min_runs=50", "gates.max_accuracy_drop=null",
              "prune.round_to=null"]  # both pipelines choose widths freely (OCSP's recipe does)
    subset = ["--train-subset", str(args.train_subset)] if args.train_subset else []
    if args.train_subset:
        common.append(f"data.train_subset={args.train_subset}")
    one = run_compress("zoo:resnet20", "resnet20-fmnist-ocsp", args.out / "one-cycle",
                       common + [f"finetune.epochs={args.epochs}"])
    dense_ckpt = args.out / "dense.safetensors"
    start = time.perf_counter()
    subprocess.run([sys.executable, "samples/train_sample.py", "--epochs", str(args.epochs - args.finetune),
                    "--out", str(dense_ckpt), *subset], check=True)
    dense_s = time.perf_counter() - start
    # the quickstart's 50-step decay interval is sized for 469 steps an epoch; keep the decay span in epochs
    interval = max(1, round(50 * args.train_subset / 60000)) if args.train_subset else 50
    two = run_compress(str(dense_ckpt), "resnet20-fmnist-dpm", args.out / "dense-then-dpm",
                       common + [f"finetune.epochs={args.finetune}", f"prune.dpm.interval={interval}"])
    method = one["method"]
    rows = [["one-cycle OCSP (from scratch)", args.epochs, f"{one['compressed']['top1']:.2f}",
             f"{one['compressed']['macs'] / one['dense']['macs']:.3f}", f"{one['training']['seconds'] / 60:.1f}",
             f"pruned after epoch {method['pruned_at']}"],
            ["dense training + DPM fine-tune", f"{args.epochs - args.finetune} + {args.finetune}",
             f"{two['compressed']['top1']:.2f}", f"{two['compressed']['macs'] / two['dense']['macs']:.3f}",
             f"{(dense_s + two['training']['seconds']) / 60:.1f}", f"dense {two['dense']['top1']:.2f}%"]]
    text = (f"# OCSP one-cycle vs dense training + DPM (Fashion-MNIST ResNet-20, macs 0.5)\n\n"
            f"`python benchmarks/ocsp.py --epochs {args.epochs} --finetune {args.finetune}{' ' + ' '.join(subset) if subset else ''}`"
            f": training on {f'the first {args.train_subset}' if subset else 'all 60k'} training images, full 10k "
            "test set.\n\n"
            + table(["pipeline", "epochs", "top-1 %", "MACs kept", "training minutes", "note"], rows)
            + f"\nStability curve of the one-cycle run: {[(h['epoch'], h['smoothed']) for h in method['stability']]}\n")
    write_result("ocsp.md", text)


if __name__ == "__main__":
    main()
