"""Prune, then quantize: torchvision models at 224 pruned to a MAC target without fine-tuning (synthetic data),
the pruned model quantized to int8 (static QDQ, onnxruntime), checked against PyTorch, and timed round robin with
the dense fp32 and the pruned fp32 files on ONNX Runtime CPU.

    python benchmarks/quantize.py [--models resnet50 mobilenet_v2 efficientnet_b0] [--macs 0.5] [--threads 2]

One row per model and CPU class in benchmarks/results/quantize.json (kept across invocations, so models and
machines can be added later);
benchmarks/results/quantize.md is rewritten from it. Accuracy is meaningless on synthetic data; parity (top-1
agreement and max abs diff relative to max |output| of the int8 file against the fp32 PyTorch model, on the
validation samples) is what this table checks.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (RESULTS, cpu_label, informative_init, input_size, latency, run_compress, table, write_result,
                    zoo_overrides)

from compressor.deploy.quantize import int8_settings
from compressor.errors import ParityError


def overrides(name: str, macs: float, threads: int, samples: int) -> list[str]:
    return zoo_overrides(name, input_size(name), macs) + [
        "export.quantize.mode=int8", f"export.quantize.calibration.samples={samples}",
        f"data.synthetic.train_size={samples}", f"data.synthetic.val_size={samples}", f"verify.samples={samples}",
        "bench.backends=[ort-cpu]", "bench.batch_sizes=[1, 8]", f"bench.threads={threads}", "bench.min_runs=20",
        "bench.min_seconds=3", "bench.warmup_ms=1000", "gates.max_accuracy_drop=null",
        # random weights on noise inputs: a few classes win every sample, or the logits are ~1e-14 (EfficientNet),
        # so argmax agreement is recorded but not required; the relative diff is the check that means something
        "verify.int8_min_top1_agreement=0"]


def one(name: str, args: argparse.Namespace) -> dict:
    checkpoint, redrawn = informative_init(name, args.out / f"{name}.init.pt")
    start = time.perf_counter()
    row = {"model": name, "macs_asked": args.macs, "redrawn": redrawn}
    try:
        report = run_compress(checkpoint, "resnet50-imagenet-latency", args.out / name,
                              overrides(name, args.macs, args.threads, args.samples))
    except ParityError as exc:
        report = json.loads((args.out / name / "report.json").read_text())
        row["error"] = exc.render()
    row["wall_s"] = time.perf_counter() - start
    q = report.get("quantized") or {}
    parity = q.get("parity") or report.get("parity", {}).get("int8") or {}
    row.update(macs_kept=report["compressed"]["macs"] / report["dense"]["macs"],
               int8_agreement=parity.get("top1_agreement"), int8_relative_diff=parity.get("relative_diff"),
               int8_passed=parity.get("passed", False), settings=q.get("settings"),
               distinct_top1=parity.get("distinct_top1"), max_abs_output=parity.get("max_abs_reference"),
               fp32_relative_diff=report["parity"]["onnx"].get("relative_diff"),
               bytes={"dense": report["dense"]["onnx_bytes"], "pruned": report["compressed"]["onnx_bytes"],
                      "int8": q.get("bytes")})
    for batch in (1, 8):
        if report.get("latency"):
            lat = latency(report, "ort-cpu", batch)
            row[f"b{batch}"] = {"dense_ms": lat["dense"]["p50"], "pruned_ms": lat["compressed"]["p50"],
                                "int8_ms": (lat.get("quantized") or {}).get("p50")}
    return row


def render(rows: dict) -> str:
    def ms(r, b):
        x = r.get(f"b{b}")
        if not x or x["int8_ms"] is None:
            return "-"
        return (f"{x['dense_ms']:.2f} / {x['pruned_ms']:.2f} (x{x['dense_ms'] / x['pruned_ms']:.2f}) / "
                f"{x['int8_ms']:.2f} (x{x['dense_ms'] / x['int8_ms']:.2f})")

    lines = [[r["model"], f"{r['macs_kept']:.3f}", f"{r['int8_agreement']:.3f}" if r["int8_agreement"] is not None
              else "-", f"{r['int8_relative_diff']:.3f}" if r["int8_relative_diff"] is not None else "-",
              "yes" if r["int8_passed"] else "**no**", r.get("distinct_top1", "-"),
              f"{r['max_abs_output']:.2g}" if r.get("max_abs_output") is not None else "-", ms(r, 1), ms(r, 8),
              f"{r['bytes']['dense'] / 2**20:.1f} / {r['bytes']['pruned'] / 2**20:.1f} / "
              f"{(r['bytes']['int8'] or 0) / 2**20:.1f}", r["machine"]] for r in rows.values()]
    return ("# Prune, then quantize (ONNX Runtime CPU)\n\n`python benchmarks/quantize.py`: torchvision models at their "
            "own input size, pruned to macs 0.5 with no fine-tuning (synthetic data, zero-initialised layers redrawn), "
            "then int8 (static QDQ, per-channel, minmax calibration on the synthetic samples). p50 latency in ms of "
            "dense fp32 / pruned fp32 / pruned int8, timed round robin in one process (speedup vs dense fp32). "
            "Parity: the int8 file against the fp32 PyTorch model on the validation samples (top-1 agreement; max abs "
            "diff / max |output|, required at most verify.int8_rtol). With random weights on noise inputs the "
            "fp32 model predicts only a few classes (column: distinct classes over the samples) and EfficientNet's "
            "logits are ~1e-14, so top-1 agreement is recorded but not required here (int8_min_top1_agreement 0); "
            "on trained models the default 0.97 applies.\n\n"
            + table(["model", "MACs kept", "int8 top-1 agreement", "int8 max diff (relative)", "parity passed",
                     "distinct classes", "max abs output",
                     "batch 1 ms: dense / pruned / int8", "batch 8 ms: dense / pruned / int8",
                     "ONNX MiB dense / pruned / int8", "CPU"], lines))


def row_key(row: dict) -> str:
    return f"{row['model']} | {row['machine']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quantize"))
    args = parser.parse_args()
    store = RESULTS / "quantize.json"
    # one row per model and CPU class: a VNNI machine's numbers do not replace an AVX2 machine's
    rows = {row_key(r): r for r in (json.loads(store.read_text()) if store.is_file() else {}).values()}
    machine = cpu_label()
    for name in args.models:
        row = one(name, args)
        row["machine"] = machine
        row["settings_auto"] = int8_settings().reason
        rows[row_key(row)] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps({k: row[k] for k in ("model", "macs_kept", "int8_agreement", "int8_relative_diff")}),
              flush=True)
    write_result("quantize.md", render(rows))


if __name__ == "__main__":
    main()
