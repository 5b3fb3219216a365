"""DPM against its hosts on the sample ResNet-20 / Fashion-MNIST, with the same fine-tune budget for every variant.

    python benchmarks/dpm_vs_host.py [--targets 0.5 0.33] [--hosts depgraph gate-decorator] [--seeds 0 1 2]
                                     [--epochs 3] [--train-subset N] [--interval 8] [--sweep] [--no-write]

Variants per host and MAC target: host single-step (oneshot at step 0), host iterative (4 events over the first
epoch), DPM-SP (rectify off) and DPM-SP+SR wrapped around the host's single step (one event at step 0 whose
structures decay over N = 8 decay steps, one every --interval optimizer steps, then are removed).
Reports mean ± std top-1 over seeds (full 10k test set), achieved MACs, params and ORT-CPU batch-1 latency.
--sweep adds the sweeps used to choose the defaults (depgraph, first target, seed 0): N at a fixed decay span
(N x interval), t_rate/t_len, events, norm scope, momentum and learning rate.

Each run's report is kept under --out and reused, so the training runs can be split over processes (e.g. one per
target with --no-write and OMP_NUM_THREADS=1) and the table written afterwards by a run over everything, whose
latency pass (seed-0 ONNX of every variant against the dense ONNX, interleaved) then runs on a quiet machine.
Writes benchmarks/results/dpm_vs_host.md.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import Shard, cached_compress, mean_std, onnx_speed, table, write_result

SAMPLE = "samples/resnet20-fmnist.safetensors"
VARIANTS = {
    "host single-step": ("oneshot", ["prune.schedule.events=1"]),
    "host iterative": ("iterative", ["prune.schedule.events=4"]),
    "DPM-SP": ("dpm", ["prune.schedule.events=1", "prune.dpm.rectify=false"]),
    "DPM-SP+SR": ("dpm", ["prune.schedule.events=1", "prune.dpm.rectify=true"]),
}


def budget(args, seed: int) -> list[str]:
    overrides = [f"finetune.epochs={args.epochs}", f"finetune.seed={seed}", "bench.backends=[]",
                 "gates.max_accuracy_drop=null", "prune.schedule.end_epoch=1", f"prune.dpm.interval={args.interval}",
                 "prune.round_to=null"]  # the published table was measured with free widths
    if args.train_subset:
        overrides.append(f"data.train_subset={args.train_subset}")
    return overrides


def run(args, host: str, target: float, method: str, extra: list[str], seed: int, tag: str) -> dict:
    overrides = budget(args, seed) + [f"prune.method={method}", f"prune.host={host}", f"prune.target={{macs: {target}}}",
                                      *extra]
    if host == "gate-decorator":
        overrides.append("prune.importance={kind: gate}")
    return cached_compress(SAMPLE, "resnet20-fmnist-dpm", args.out / f"{tag}-s{seed}", overrides)


def summarise(reports: list[dict], speed: bool) -> list:
    top1 = [r["compressed"]["top1"] for r in reports]
    dense = reports[0]["dense"]
    macs = statistics.mean(r["compressed"]["macs"] / dense["macs"] for r in reports)
    params = statistics.mean(r["compressed"]["params"] for r in reports)
    totals = [r["method"].get("totals", {}) for r in reports]
    released = sum(t.get("released", 0) for t in totals)
    latency = "-"
    if speed:
        run_dir = Path(reports[0]["run_dir"])
        s = onnx_speed(run_dir / "dense.onnx", run_dir / "model.onnx", batch=1)
        latency = f"{s['p50']:.3f} (x{s['speedup']:.2f})"
    return [mean_std(top1), f"{statistics.mean(top1) - dense['top1']:+.2f}", f"{macs:.3f}", f"{params / 1e3:.1f} K",
            latency, released]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.33])
    parser.add_argument("--hosts", nargs="+", default=["depgraph", "gate-decorator"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--interval", type=int, default=8, help="DPM optimizer steps between decay steps")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--main", action=argparse.BooleanOptionalAction, default=True, help="the main table's runs")
    parser.add_argument("--no-write", dest="write", action="store_false", help="train only; no latency, no table")
    parser.add_argument("--shard", default=None, help="K/N: train every N-th configuration only (no table)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dpm"))
    args = parser.parse_args()
    args.write = args.write and not args.shard
    args.shard = Shard(args.shard)
    text = ""
    if args.main:
        text += main_table(args)
    if args.sweep:
        text += sweep(args)
    if args.write:
        write_result("dpm_vs_host.md", header(args) + text)


def header(args) -> str:
    subset = f"the first {args.train_subset} training images" if args.train_subset else "the full training set"
    return (f"# DPM vs host on the sample ResNet-20 (Fashion-MNIST)\n\n`python benchmarks/dpm_vs_host.py --epochs "
            f"{args.epochs}{f' --train-subset {args.train_subset}' if args.train_subset else ''} --interval "
            f"{args.interval} --seeds {' '.join(map(str, args.seeds))}{' --sweep' if args.sweep else ''}`: "
            f"{args.epochs} fine-tune epochs (SGD lr 0.01, cosine) on {subset}, full 10k test set, dense sample "
            f"93.42%. Host events and DPM selection in the first epoch; DPM: N = 8 decay steps every {args.interval} "
            "optimizer steps. Latency: ORT-CPU (2 threads) batch 1 p50 of the seed-0 export, interleaved with the "
            "dense ONNX (speedup in brackets).\n\n")


def main_table(args) -> str:
    rows = []
    for target in args.targets:
        for host in args.hosts:
            for variant, (method, extra) in VARIANTS.items():
                tag = f"{host}-{target}-{variant}".replace(" ", "_")
                if not args.shard.mine():
                    continue
                reports = [run(args, host, target, method, extra, s, tag) for s in args.seeds]
                rows.append([host, target, variant, *summarise(reports, args.write)])
                print(rows[-1], flush=True)
    return table(["host", "macs target", "variant", "top-1 % (mean ± std)", "vs dense pp", "MACs kept", "params",
                  "ORT p50 ms b1 (speedup)", "released"], rows)


SWEEP = [(f"N={n}, interval={64 // n}", [f"prune.dpm.steps={n}", f"prune.dpm.interval={64 // n}"]) for n in (2, 32)] + [
    (f"t_rate={r}, t_len={t}", [f"prune.dpm.t_rate={r}", f"prune.dpm.t_len={t}"]) for r, t in ((0.05, 0.5), (0.2, 2.0))] + [
    ("events=4 (wrapping the iterative host)", ["prune.schedule.events=4"]),
    ("norm_scope=group", ["prune.dpm.norm_scope=group"]),
    ("momentum=reset", ["prune.dpm.momentum=reset"]),
    ("lr=0.02", ["finetune.optimizer.lr=0.02"]),
]


def sweep(args) -> str:
    target, seed = args.targets[0], args.seeds[0]
    base = ["prune.schedule.events=1", "prune.dpm.rectify=true"]
    rows = []
    for name, extra in SWEEP:
        tag = "sweep-" + name.split(" (")[0].replace(", ", "-").replace("=", "")
        if not args.shard.mine():
            continue
        report = run(args, "depgraph", target, "dpm", base + extra, seed, tag)
        rows.append([name, *summarise([report], args.write)])
        print(rows[-1], flush=True)
    return (f"\n## Sweeps (DPM-SP+SR around depgraph, macs {target}, seed {seed}; the defaults are N=8, interval="
            f"{args.interval}, t_rate=0.1, t_len=1.0, one event, norm_scope=out, momentum=keep, lr=0.01)\n\n"
            + table(["setting", "top-1 %", "vs dense pp", "MACs kept", "params", "ORT p50 ms b1 (speedup)",
                     "released"], rows))


if __name__ == "__main__":
    main()
