"""FGGP on the sample ResNet-20 / Fashion-MNIST with the same fine-tune budget and seeds for every variant.

    python benchmarks/fggp.py [--epochs 3] [--seeds 0 1 2] [--train-subset N] [--interval 10] [--no-write]

Unstructured at 90% and 95% sparsity: FGGP (gradient-first, r = 0.5) vs gradual magnitude pruning (same cubic
schedule, magnitude only) vs gradient only. Structured at macs 0.5: FGGP-structured vs the DepGraph host
(iterative, 4 events in the first epoch). Mean ± std top-1 (full 10k test set), sparsity or MACs, zipped ONNX size.
Runs are kept under --out and reused (see dpm_vs_host.py). Writes benchmarks/results/fggp.md.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import Shard, cached_compress, mean_std, table, write_result

SAMPLE = "samples/resnet20-fmnist.safetensors"


def runs(args, recipe: str, tag: str, extra: list[str]) -> list[dict]:
    if not args.shard.mine():
        return []
    base = [f"finetune.epochs={args.epochs}", "bench.backends=[]", "gates.max_accuracy_drop=null"]
    if args.train_subset:
        base.append(f"data.train_subset={args.train_subset}")
    return [cached_compress(SAMPLE, recipe, args.out / f"{tag}-s{seed}", base + extra + [f"finetune.seed={seed}"])
            for seed in args.seeds]


def row(label: str, reports: list[dict], kind: str) -> list:
    if not reports:
        return [label, "(other shard)"]
    dense = reports[0]["dense"]
    top1 = [r["compressed"]["top1"] for r in reports]
    if kind == "sparsity":
        measure = statistics.mean(r["method"]["sparsity"]["overall"] for r in reports)
    else:
        measure = statistics.mean(r["compressed"]["macs"] / dense["macs"] for r in reports)
    size = "onnx_zipped_bytes" if kind == "sparsity" else "onnx_bytes"  # zipped only where zeros stay in the file
    zipped = statistics.mean(r["compressed"][size] / dense[size] for r in reports)
    return [label, mean_std(top1), f"{statistics.mean(top1) - dense['top1']:+.2f}", f"{measure:.3f}", f"{zipped:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--interval", type=int, default=10, help="iterations between FGGP events")
    parser.add_argument("--shard", default=None, help="K/N: train every N-th configuration only (no table)")
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fggp"))
    args = parser.parse_args()
    args.write = args.write and not args.shard
    args.shard = Shard(args.shard)
    interval = f"prune.fggp.interval={args.interval}"
    unstructured, structured = [], []
    for sparsity in (0.9, 0.95):
        for selection in ("gradient-first", "magnitude", "gradient"):
            reports = runs(args, "resnet20-fmnist-fggp-unstructured", f"u{sparsity}-{selection}",
                           [f"prune.fggp.sparsity={sparsity}", f"prune.fggp.selection={selection}", interval])
            unstructured.append(row(f"{sparsity:.0%} {selection}", reports, "sparsity"))
            print(unstructured[-1], flush=True)
    structured = [
        row("FGGP structured", runs(args, "resnet20-fmnist-fggp-structured", "s-fggp", [interval]), "macs"),
        row("DepGraph host, iterative", runs(args, "resnet20-fmnist-iterative", "s-host",
                                             ["prune.schedule.end_epoch=1"]), "macs")]
    if not args.write:
        return
    subset = f"the first {args.train_subset} training images" if args.train_subset else "the full training set"
    head = ["variant", "top-1 % (mean ± std)", "vs dense pp"]
    text = (f"# FGGP on the sample ResNet-20 (Fashion-MNIST)\n\n`python benchmarks/fggp.py --epochs {args.epochs}"
            f"{f' --train-subset {args.train_subset}' if args.train_subset else ''} --interval {args.interval} "
            f"--seeds {' '.join(map(str, args.seeds))}`: {args.epochs} epochs (SGD lr 0.01, cosine) on {subset}, "
            f"an FGGP event every {args.interval} iterations, full 10k test set, dense sample 93.42%.\n\n"
            "## Unstructured (dense runtimes gain no latency from these zeros)\n\n"
            + table(head + ["sparsity", "zipped ONNX (of dense)"], unstructured)
            + "\n## Structured, macs 0.5\n\n" + table(head + ["MACs kept", "ONNX file (of dense)"], structured))
    write_result("fggp.md", text)


if __name__ == "__main__":
    main()
