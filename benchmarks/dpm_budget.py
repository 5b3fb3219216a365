"""DPM at a budget users would train with (issue 19): the sample ResNet-20 on Fashion-MNIST, macs 0.5 (and 0.33),
at least 10x the optimizer steps of dpm_vs_host.py's table.

    python benchmarks/dpm_budget.py [--phase budget main other] [--only TAG ...] [--list] [--table-only]
                                    [--results DIR] [--runs DIR]

Phases, in the order they run (plan: about 4 CPU hours on 2 cores; never two torch jobs at once):
  budget  seed 0, depgraph, macs 0.5: single-step and DPM-SP+SR at the base budget, each with and without
          distillation from the dense model; tells whether the best drop falls below 0.5 pp and whether
          distillation helps.
  main    seeds 0, 1, 2, macs 0.5: hosts depgraph and otov2, single-step vs DPM-SP+SR (seed by seed). otov2 runs
          HSPG (prune.otov2 defaults: lmbda 0.5) for 2 epochs before its event (schedule start_epoch 2).
  other   seed 0: gate-decorator at macs 0.5, depgraph at macs 0.33 (single-step and DPM-SP+SR).

Base budget: 15 fine-tune epochs on 20k training images (seeded subset), batch 128, SGD lr 0.01 cosine: 2,345
optimizer steps (10x the 235 of the short table). Free widths (prune.round_to null) so that the comparison is about
the method, not the machine's SIMD width; the DPM decay (8 steps, one every 50 optimizer steps) starts at step 0.

Every finished run writes DIR/<tag>.json (accuracy, MACs, releases, every self-rectifying check's C_rate and C_len)
and is committed; a run whose file exists is not run again, so a later session on another machine resumes. The
table (benchmarks/results/dpm_budget.md) is rewritten from the files after every run.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import RESULTS, cached_compress, mean_std, table

SAMPLE = "samples/resnet20-fmnist.safetensors"
RECIPE = "resnet20-fmnist-dpm"
EPOCHS, SUBSET = 15, 20000
VARIANTS = {
    "single-step": ("oneshot", []),
    "DPM-SP": ("dpm", ["prune.dpm.rectify=false"]),
    "DPM-SP+SR": ("dpm", ["prune.dpm.rectify=true"]),
}


@dataclass(frozen=True)
class Cell:
    phase: str
    host: str
    target: float
    variant: str
    seed: int = 0
    distill: bool = False
    epochs: int = EPOCHS
    subset: int = SUBSET

    @property
    def tag(self) -> str:
        return (f"{self.host}-m{self.target}-{self.variant}-e{self.epochs}-n{self.subset // 1000}k"
                f"{'-kd' if self.distill else ''}-s{self.seed}")

    def overrides(self) -> list[str]:
        method, extra = VARIANTS[self.variant]
        out = [f"finetune.epochs={self.epochs}", f"data.train_subset={self.subset}", f"finetune.seed={self.seed}",
               "bench.backends=[]", "gates.max_accuracy_drop=null", "prune.round_to=null",
               "prune.schedule.events=1", "prune.schedule.end_epoch=1", f"prune.method={method}",
               f"prune.host={self.host}", f"prune.target={{macs: {self.target}}}",
               f"finetune.distill.enabled={'true' if self.distill else 'false'}", *extra]
        if self.host == "gate-decorator":
            out.append("prune.importance={kind: gate}")
        if self.host == "otov2":  # HSPG needs training before the removal: 2 epochs, then the event (or DPM's decay)
            out += ["prune.schedule.start_epoch=2", "prune.schedule.end_epoch=3"]
        return out


def cells(hosts_available: set[str]) -> list[Cell]:
    budget = [Cell("budget", "depgraph", 0.5, v, distill=kd) for kd in (False, True)
              for v in ("single-step", "DPM-SP+SR")]
    main = [Cell("main", h, 0.5, v, seed=s) for s in (0, 1, 2) for h in ("depgraph", "otov2") if h in hosts_available
            for v in ("single-step", "DPM-SP+SR")]
    other = [Cell("other", "depgraph", 0.5, "DPM-SP")]
    other += [Cell("other", "gate-decorator", 0.5, v) for v in ("single-step", "DPM-SP+SR")]
    other += [Cell("other", "depgraph", 0.33, v) for v in ("single-step", "DPM-SP+SR")]
    unique = {}
    for c in budget + main + other:  # a main cell's seed 0 is the budget phase's run
        unique.setdefault(c.tag, c)
    return list(unique.values())


def sr_summary(checks: list[list]) -> dict:
    """Releases per decay step and the C_rate / C_len quartiles of every self-rectifying check."""
    per_step: dict[int, list[int]] = {}
    for _, n, _, _, released in checks:
        per_step.setdefault(n, [0, 0])
        per_step[n][0] += 1
        per_step[n][1] += int(released)
    rates = sorted(c[2] for c in checks)
    lens = sorted(c[3] for c in checks if c[3] is not None)

    def quartiles(values):
        return [values[int(q * (len(values) - 1))] for q in (0.0, 0.25, 0.5, 0.75, 1.0)] if values else []

    return {"checks": len(checks), "checks_and_releases_per_decay_step": per_step,
            "c_rate_quartiles": quartiles(rates), "c_len_quartiles": quartiles(lens)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return {"cpu": cpu, "isa": isa}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run_cell(cell: Cell, results: Path, runs: Path) -> dict:
    start = time.perf_counter()
    report = cached_compress(SAMPLE, RECIPE, runs / cell.tag, cell.overrides())
    method = report["method"]
    totals = method.get("totals", {})
    row = {**asdict(cell), "tag": cell.tag, "dense_top1": report["dense"]["top1"],
           "top1": report["compressed"]["top1"], "drop_pp": report["dense"]["top1"] - report["compressed"]["top1"],
           "macs_kept": report["compressed"]["macs"] / report["dense"]["macs"],
           "params": report["compressed"]["params"], "dense_params": report["dense"]["params"],
           "optimizer_steps": cell.epochs * math.ceil(cell.subset / report["recipe"]["data"]["batch_size"]),
           "train_seconds": report["training"]["seconds"], "wall_s": time.perf_counter() - start,
           "totals": totals, "sr": sr_summary(method.get("sr_checks", [])), "sr_checks": method.get("sr_checks", []),
           "history": [{k: h.get(k) for k in ("epoch", "train_loss", "val_top1")}
                       for h in report["training"]["history"]],
           "machine": machine(), "commit": commit(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{cell.tag}.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def write_table(results: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["host"], r["target"], r["variant"], r["distill"], r["epochs"], r["subset"]), []).append(r)
    lines = []
    for (host, target, variant, distill, epochs, subset), rs in sorted(groups.items(), key=str):
        top1 = [r["top1"] for r in rs]
        lines.append([host, target, variant + (" +KD" if distill else ""), f"{epochs} ep x {subset // 1000}k",
                      len(rs), mean_std(top1), f"{statistics.mean(r['drop_pp'] for r in rs):+.2f}",
                      f"{statistics.mean(r['macs_kept'] for r in rs):.3f}",
                      f"{sum(r['totals'].get('released', 0) for r in rs)} / "
                      f"{sum(r['totals'].get('selected', 0) for r in rs)}",
                      ", ".join(sorted({r['machine']['isa'] for r in rs}))])
    text = ("# DPM at a longer budget (issue 19)\n\n`python benchmarks/dpm_budget.py`; one JSON per finished run in "
            "benchmarks/results/dpm_budget/. Dense sample top-1 93.42%. Drop = dense - pruned (positive = worse); "
            "released / selected: DPM structures released by self-rectifying / selected, over the cell's seeds.\n\n"
            + table(["host", "macs", "variant", "budget", "seeds", "top-1 %", "drop pp", "MACs kept",
                     "released / selected", "CPU"], lines))
    dpm_runs = [r for r in rows if r["sr"]["checks"]]
    if dpm_runs:
        text += ("\n## Self-rectifying at this budget\n\nEvery SR check of a decaying structure (one per structure and "
                 "decay step after the first): C_rate = escape / target norm, C_len = escape / mean move of the group's "
                 "other channels; released when C_rate > t_rate (0.1) and C_len > t_len (1.0). Quartiles (min, 25%, "
                 "median, 75%, max); dpm_budget_sr.png plots them.\n\n")
        text += table(["run", "checks", "released", "releases per decay step n (checks)", "C_rate quartiles",
                       "C_len quartiles"],
                      [[r["tag"], r["sr"]["checks"], r["totals"].get("released", 0),
                        ", ".join(f"n={n}: {v[1]} ({v[0]})" for n, v in sorted(
                            r["sr"]["checks_and_releases_per_decay_step"].items(), key=lambda kv: int(kv[0]))),
                        " / ".join(f"{q:.3g}" for q in r["sr"]["c_rate_quartiles"]),
                        " / ".join(f"{q:.3g}" for q in r["sr"]["c_len_quartiles"])] for r in dpm_runs])
        text += ("\n## Would other thresholds release earlier?\n\nThe logged checks of every SR run above, counted "
                 "again under other thresholds (first order: a release changes what follows, which this does not "
                 "replay). `step` measures C_rate against one decay step L0 / N instead of the current target "
                 "L0 (1 - n / N), i.e. C_rate x (N - n).\n\n")
        text += table(["C_rate basis", "t_rate", "t_len", "would release at decay step n (count)"],
                      [[basis, t_rate, t_len, ", ".join(f"n={n}: {c}" for n, c in sweep) or "none"]
                       for basis, t_rate, t_len, sweep in threshold_sweep(dpm_runs)])
        plot_sr(dpm_runs, RESULTS / "dpm_budget_sr.png")
    (RESULTS / "dpm_budget.md").write_text(text)
    return text


def threshold_sweep(runs: list[dict], steps: int = 8) -> list[tuple]:
    """Per (basis, t_rate, t_len): how many logged checks would pass, by decay step n."""
    out = []
    for basis in ("target", "step"):
        for t_rate in (0.02, 0.05, 0.1, 0.2, 0.5):
            for t_len in ((0.5, 1.0, 2.0) if basis == "target" else (1.0,)):
                counts: dict[int, int] = {}
                for r in runs:
                    for _, n, c_rate, c_len, _ in r["sr_checks"]:
                        rate = c_rate * (steps - n) if basis == "step" else c_rate
                        if rate > t_rate and (c_len is None or c_len > t_len):
                            counts[n] = counts.get(n, 0) + 1
                out.append((basis, t_rate, t_len, sorted(counts.items())))
    return out


def plot_sr(runs: list[dict], path: Path) -> None:
    """C_rate against C_len of every SR check (released in red) and releases per decay step, one row per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for (scatter, bars), r in zip(axes, runs):
        checks = [c for c in r["sr_checks"] if c[3] is not None]
        for released, color in ((False, "#2e86de"), (True, "#e74c3c")):
            pts = [(c[2], c[3]) for c in checks if bool(c[4]) == released]
            if pts:
                scatter.scatter(*zip(*pts), s=5, alpha=0.4, color=color,
                                label=f"{'released' if released else 'kept decaying'} ({len(pts)})")
        scatter.axvline(0.1, color="grey", ls="--", lw=1)
        scatter.axhline(1.0, color="grey", ls="--", lw=1)
        scatter.set_xscale("symlog", linthresh=0.01)
        scatter.set_yscale("symlog", linthresh=0.1)
        scatter.set_xlabel("C_rate")
        scatter.set_ylabel("C_len")
        scatter.set_title(r["tag"], fontsize=9)
        scatter.legend(fontsize=7)
        steps = sorted(r["sr"]["checks_and_releases_per_decay_step"].items(), key=lambda kv: int(kv[0]))
        bars.bar([int(n) for n, _ in steps], [v[1] for _, v in steps], color="#e74c3c")
        bars.set_xlabel("decay step n at the check")
        bars.set_ylabel("structures released")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", nargs="+", default=["budget", "main", "other"])
    parser.add_argument("--only", nargs="+", default=None, help="run only these tags")
    parser.add_argument("--list", action="store_true", help="print the planned runs and whether each is done")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS / "dpm_budget")
    parser.add_argument("--runs", type=Path, default=Path("runs/dpm-budget"))
    args = parser.parse_args()
    from compressor.prune.methods import HOSTS

    plan = [c for c in cells(set(HOSTS.names())) if c.phase in args.phase and (not args.only or c.tag in args.only)]
    if args.list:
        for c in plan:
            print(("done " if (args.results / f"{c.tag}.json").exists() else "todo ") + c.tag)
        return
    if not args.table_only:
        for c in plan:
            if (args.results / f"{c.tag}.json").exists():
                continue
            print(f"== {c.tag}", flush=True)
            row = run_cell(c, args.results, args.runs)
            print(f"   top-1 {row['top1']:.2f} (drop {row['drop_pp']:+.2f} pp), MACs {row['macs_kept']:.3f}, "
                  f"released {row['totals'].get('released', 0)}, {row['wall_s'] / 60:.1f} min", flush=True)
            write_table(args.results)
    print(write_table(args.results))


if __name__ == "__main__":
    main()
