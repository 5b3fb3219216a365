"""Decoder language model pruned for depth and for width, DPM against the single-step host at the same
distillation budget (issue 34, "Must show"), on the dense sample Llama trained from scratch on the Python standard
library's sources.

    python benchmarks/llm.py [--runs depth width] [--methods dpm oneshot] [--steps 120] [--threads N]
                             [--out runs/bench-llm] [--results DIR] [--retry-failed] [--quick]

Dense model: samples/llama-pystdlib (samples/train_llm.py: Llama architecture, 8 layers, hidden 480, 8 query heads
of 64 in 4 key/value groups (GQA), MLP 1408, byte-level BPE vocabulary 8192, about 26 M parameters), corpus data/pycorpus
(samples/make_corpus.py: the stdlib's .py files without the test suites, split by file hash).

Runs (each one `compress` library call; recipe.yaml in each run folder):
  depth  prune.decoder.kinds [layers], target channels 0.25: 2 of the 8 decoder layers removed, ranked by block
         influence (layer_importance: block_influence: the layers that change the hidden state least on 8 training
         batches go, for both methods);
  width  prune.decoder.kinds [mlp, kv_groups], target channels 0.3 with ratios {kv_groups: 0.25}: 30% of every
         layer's MLP channels and 1 of its 4 key/value groups with their 2 query heads (0.3 of 4 groups is not a
         whole group: the recipe names 0.25 or 0.5 as the allowed fractions);
with two methods at the same budget: the same data, steps, optimizer, lr, seed and distillation from the dense model
(KL of the next-token distributions, alpha 0.5, temperature 2), only the prune method differs:
  dpm      DPM-SP+SR around the magnitude host: the selected structures decay to zero over 8 steps in the first
           quarter of the run (a layer decays to the identity: its attention and MLP output rows shrink), then go;
  oneshot  the host alone: the same magnitude selection removed before the first optimizer step.
Uniform widths (prune.decoder.uniform: true), so each pruned model is an ordinary Llama config saved as hf/ that
AutoModelForCausalLM.from_pretrained loads.

Measured per run: held-out perplexity of the dense and the pruned model over every block of val/ (token-weighted),
the ONNX model's perplexity, and the final bench: dense.onnx and model.onnx (both with their key/value caches, the
same exporter) timed in turn on ONNX Runtime CPU at batch 1, a 128-token prompt and 32 generated tokens: prefill ms
and decode tokens/s. Goals (issue 34): perplexity within 5% of the dense model's, decode tokens/s at least x1.3
(depth) and x1.25 (width). One JSON per finished run in benchmarks/results/llm/, resumable as
benchmarks/detection.py; benchmarks/results/llm.md is rewritten after every run.

--quick checks the script in minutes: a tiny random-init Llama and a tiny corpus in a temporary folder, a few steps,
short prompts; the numbers measure nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))  # benchmarks/transformers.py must not shadow the transformers package

from common import RESULTS, cpu_description, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "samples" / "llama-pystdlib"
CORPUS = ROOT / "data" / "pycorpus"
PPL_GOAL = 0.05  # perplexity at most 5% above the dense model's
SPEED_GOALS = {"depth": 1.3, "width": 1.25}  # decode tokens/s speedup at least
METHODS = ("dpm", "oneshot")
METHOD_LABELS = {"dpm": "DPM-SP+SR (magnitude host)", "oneshot": "oneshot (magnitude host)"}
RUNS = {
    "depth": {"label": "25% of the layers, by block influence",
              "decoder": {"kinds": ["layers"], "layer_importance": "block_influence"}, "channels": 0.25},
    "width": {"label": "30% of the MLP width + 1 of 4 KV groups per layer",
              "decoder": {"kinds": ["mlp", "kv_groups"], "ratios": {"kv_groups": 0.25}}, "channels": 0.3},
}
DPM_STEPS = 8


def recipe(run: str, method: str, *, model: Path, corpus: Path, steps: int, batch: int, block: int,
           prompt: int, new: int, threads: Optional[int], quick: bool = False) -> dict[str, Any]:
    """The recipe of one run (a dict for recipe_from_dict): one epoch over `steps` x `batch` training blocks."""
    spec = RUNS[run]
    prune: dict[str, Any] = {
        "method": method, "host": "depgraph", "importance": {"kind": "magnitude", "p": 2},
        "target": {"channels": spec["channels"]}, "decoder": {**spec["decoder"], "uniform": True}}
    if method == "dpm":  # one selection at step 0, decayed over the first quarter of the run, then removed
        prune["schedule"] = {"events": 1, "start_epoch": 0, "end_epoch": 1, "shape": "linear"}
        prune["dpm"] = {"steps": DPM_STEPS, "interval": max(1, round(0.25 * steps / DPM_STEPS)), "rectify": True,
                        "t_rate": 0.1, "t_len": 1.0, "backfill": True, "cooldown": 1, "norm_scope": "out",
                        "momentum": "keep"}
    else:
        prune["schedule"] = {"start_epoch": 0}
    return {
        "name": f"llm-{run}-{method}",
        "description": f"benchmarks/llm.py: {spec['label']}, {METHOD_LABELS[method]}",
        "task": "language-modeling",
        "model": {"arch": f"hf:{model}", "inputs": "tokens", "input_shape": [block]},
        "data": {"kind": "text", "batch_size": batch, "train_subset": steps * batch, "augment": False,
                 "text": {"train": str(corpus / "train"), "val": str(corpus / "val"), "block_size": block,
                          "extensions": [".py"]}},
        "prune": prune,
        "finetune": {"epochs": 1, "seed": 0,
                     "optimizer": {"kind": "adamw", "lr": 3e-4, "weight_decay": 0.1},
                     "scheduler": {"kind": "cosine", "warmup_epochs": 0},
                     "distill": {"enabled": True, "alpha": 0.5, "temperature": 2.0}},
        "export": {"tensorrt": {"enabled": False}},
        "verify": {"samples": 8 if quick else 32},
        "bench": {"backends": ["ort-cpu"], "batch_sizes": [1], "prompt_tokens": prompt, "new_tokens": new,
                  "warmup_ms": 50 if quick else 500, "min_runs": 3 if quick else 10,
                  "min_seconds": 0.2 if quick else 5.0, "threads": threads},
        "gates": {},
    }


def tag(run: str, method: str) -> str:
    return f"{run}-{method}"


def run_one(run: str, method: str, *, cfg_dict: dict, out: Path, command: str) -> dict[str, Any]:
    """One compress (or the finished report its folder holds) as a trimmed row; a failure is a row with its
    status, so the other runs go on."""
    from compressor.app.pipeline import compress
    from compressor.app.recipe import recipe_from_dict
    from compressor.errors import CompressorError

    cfg = recipe_from_dict(cfg_dict, f"benchmarks/llm.py {tag(run, method)}")
    head = {"run": run, "method": method, "command": command, "cpu": cpu_description(),
            "decoder": cfg_dict["prune"]["decoder"], "target": cfg_dict["prune"]["target"],
            "steps": cfg_dict["data"]["train_subset"] // cfg_dict["data"]["batch_size"]}
    done = out / "report.json"
    start = time.perf_counter()
    try:
        if done.is_file() and json.loads(done.read_text()).get("status") == "ok":
            report = json.loads(done.read_text())
        else:
            print(f"run {out}", flush=True)
            report = compress(cfg_dict["model"]["arch"], cfg, out, overwrite=True)
            report["wall_s"] = time.perf_counter() - start
    except CompressorError as exc:
        return head | {"finished": now(), "status": f"failed: {type(exc).__name__}: {exc.render()}",
                       "wall_s": time.perf_counter() - start}
    except Exception as exc:  # a defect: kept with its traceback, the other runs go on
        return head | {"finished": now(), "status": f"failed: {type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-4000:], "wall_s": time.perf_counter() - start}
    return head | {"finished": now()} | trim(report, run)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def trim(report: dict[str, Any], run: str) -> dict[str, Any]:
    """What this benchmark keeps of a compress report, and the issue's goals checked on it."""
    dense, comp = report["dense"], report["compressed"]
    row: dict[str, Any] = {"status": report.get("status", "ok"), "run_dir": report.get("run_dir"),
                           "dense_ppl": dense["perplexity"], "ppl": comp["perplexity"],
                           "onnx_ppl": comp.get("onnx_perplexity")}
    row["ppl_increase"] = row["ppl"] / row["dense_ppl"] - 1.0
    bench = next((r for r in report.get("latency", []) if r["backend"] == "ort-cpu"), None)
    if bench is not None and bench.get("dense"):
        row.update(prefill_ms=[bench["dense"]["prefill_ms"], bench["compressed"]["prefill_ms"]],
                   tokens_per_second=[bench["dense"]["decode_tokens_per_second"],
                                      bench["compressed"]["decode_tokens_per_second"]],
                   decode_speedup=bench["decode_speedup"], prefill_speedup=bench["prefill_speedup"],
                   prompt_tokens=bench["prompt_tokens"], new_tokens=bench["new_tokens"])
    row["macs_ratio"] = comp["macs"] / dense["macs"]
    row["params_ratio"] = comp["params"] / dense["params"]
    row["hf"] = report.get("exports", {}).get("hf_pretrained")  # written, path, max_abs_diff of the reload
    hf_config = Path(row["hf"]["path"]) / "config.json" if (row["hf"] or {}).get("written") else None
    if hf_config is not None and hf_config.is_file():  # the pruned model's shape as from_pretrained reads it
        config = json.loads(hf_config.read_text())
        row["config"] = {k: config.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                    "num_attention_heads", "num_key_value_heads", "head_dim")}
    parity = report.get("parity", {}).get("onnx", {})
    row["parity"] = {k: parity.get(k) for k in ("passed", "max_abs_diff", "relative_diff")}
    row["released"] = report.get("method", {}).get("totals", {}).get("released")
    row["timings_s"] = {k: round(v, 1) for k, v in report.get("timings_s", {}).items()}
    row["wall_s"] = report.get("wall_s", sum(report.get("timings_s", {}).values()))
    row["environment"] = {k: report.get("environment", {}).get(k) for k in ("cpu", "cpu_count", "threads",
                                                                           "onnxruntime_version", "torch_version")}
    speed = row.get("decode_speedup")
    row["ppl_met"] = row["ppl_increase"] <= PPL_GOAL
    row["speed_goal"] = SPEED_GOALS[run]
    row["speed_met"] = None if speed is None else speed >= SPEED_GOALS[run]
    return row


# ---------------------------------------------------------------------------------------------- the markdown
def yes_no(value: Optional[bool]) -> str:
    return "-" if value is None else "yes" if value else "**no**"


HEADER = ["run", "method", "perplexity dense → pruned", "increase", "≤ 5%", "ONNX perplexity", "decode tokens/s "
          "dense → pruned", "decode speedup", "goal", "prefill ms dense → pruned", "MACs kept", "params kept",
          "steps", "wall min"]


def cells(row: dict[str, Any]) -> list[str]:
    label = f"{row['run']}: {RUNS[row['run']]['label']}"
    method = METHOD_LABELS.get(row["method"], row["method"])
    if row.get("status") != "ok":
        return [label, method, row.get("status", "not run yet").replace("|", "/")[:300]] + [""] * (len(HEADER) - 3)
    tps, pre = row.get("tokens_per_second"), row.get("prefill_ms")
    return [label, method, f"{row['dense_ppl']:.3f} → {row['ppl']:.3f}", f"{100 * row['ppl_increase']:+.1f}%",
            yes_no(row["ppl_met"]), "-" if row.get("onnx_ppl") is None else f"{row['onnx_ppl']:.3f}",
            f"{tps[0]:.1f} → {tps[1]:.1f}" if tps else "-",
            f"x{row['decode_speedup']:.2f}" if row.get("decode_speedup") else "-",
            f"{yes_no(row.get('speed_met'))} (≥ x{row['speed_goal']:g})",
            f"{pre[0]:.2f} → {pre[1]:.2f}" if pre else "-", f"{row['macs_ratio']:.3f}", f"{row['params_ratio']:.3f}",
            str(row.get("steps", "-")), f"{row['wall_s'] / 60:.0f}" if row.get("wall_s") else "-"]


def versus(run: str, rows: dict[str, dict]) -> str:
    dpm, one = rows.get("dpm"), rows.get("oneshot")
    if not (dpm and one and dpm.get("status") == one.get("status") == "ok"):
        return f"- {run}: no comparison yet."
    return (f"- {run}: DPM perplexity {dpm['ppl']:.3f} ({100 * dpm['ppl_increase']:+.1f}%), oneshot {one['ppl']:.3f} "
            f"({100 * one['ppl_increase']:+.1f}%): DPM − oneshot = {dpm['ppl'] - one['ppl']:+.3f} "
            f"({'DPM better' if dpm['ppl'] < one['ppl'] else 'oneshot better' if one['ppl'] < dpm['ppl'] else 'equal'}"
            f"); decode x{dpm.get('decode_speedup') or 0:.2f} / x{one.get('decode_speedup') or 0:.2f}; one seed each.")


def render(rows: list[dict[str, Any]], *, command: str, cpu: str, date: str) -> str:
    finished = [r for r in rows if r.get("status") == "ok"]
    quick = any(r.get("quick") for r in rows)
    cpus = sorted({r["cpu"] for r in finished if r.get("cpu")}) or [cpu]
    text = ("# Decoder LM: depth and width pruning, DPM vs the single-step host\n\n"
            + ("**--quick: a tiny random-init model on a tiny corpus; the numbers check the script, they measure "
               "nothing.**\n\n" if quick else "")
            + f"`{command}` (written {date}). CPU: {'; '.join(cpus)}.\n\n"
            "Dense model: samples/llama-pystdlib (Llama, GQA 8 query / 4 key-value heads, 8 layers, about 26 M "
            "parameters) trained from scratch on the Python standard library's sources (samples/train_llm.py). "
            "Each run distils from the dense model for the steps column (batch 16 of 256-token blocks, AdamW lr "
            "3e-4, cosine, seed 0), uniform widths (the pruned model reloads with from_pretrained). Perplexity: "
            "token-weighted over every block of the held-out files. Speed: dense.onnx and model.onnx with their "
            "key/value caches, timed in turn on ONNX Runtime CPU, batch 1, 128-token prompt, 32 generated tokens "
            "(medians). Goals (issue 34): perplexity within 5% of dense; decode tokens/s x1.3 (depth), x1.25 "
            "(width).\n\n")
    text += table(HEADER, [cells(r) for r in rows])
    text += "\nDPM vs the single-step host:\n\n"
    for run in RUNS:
        own = {r["method"]: r for r in rows if r["run"] == run}
        if own:
            text += versus(run, own) + "\n"
    return text


# ---------------------------------------------------------------------------------------------- the driver
def quick_inputs(root: Path) -> tuple[Path, Path]:
    """--quick: a tiny random-init Llama (GQA) with a byte-level BPE tokenizer trained on a tiny corpus of this
    repository's own Python files."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "samples"))
    from train_llm import train_tokenizer  # noqa: E402  (the sample's own tokenizer recipe)

    corpus = root / "corpus"
    files = sorted((ROOT / "compressor" / "prune").glob("*.py"))
    for i, path in enumerate(files):
        side = "val" if i % 5 == 0 else "train"
        (corpus / side).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, corpus / side / path.name)
    model_dir = root / "llama-tiny"
    tokenizer = train_tokenizer(sorted((corpus / "train").glob("*.py")), 512, model_dir)
    torch.manual_seed(0)
    # heads of 16 (ONNX Runtime's GroupQueryAttention); hidden 48 a multiple of 8 and 6 query heads (3 of 4 groups)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    return model_dir, corpus


def load_rows(store: Path, runs: list[str], methods: list[str], dense: Path) -> list[dict[str, Any]]:
    saved = {(r["run"], r["method"]): r for r in (json.loads(p.read_text()) for p in sorted(store.glob("*.json")))}
    keys = set(saved) | {(r, m) for r in runs for m in methods}
    rows = []
    for run, method in sorted(keys, key=lambda k: (list(RUNS).index(k[0]), METHODS.index(k[1]))):
        rows.append(saved.get((run, method)) or {"run": run, "method": method, "status": "not trained yet"
                                                 if not (dense / "config.json").is_file() else "not run yet"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="distillation steps of every run (default 120, "
                        "as in the committed results: about 20 min per run on 2 cores)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the bench")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default runs/bench-llm)")
    parser.add_argument("--results", type=Path, default=None, help="where llm.md and llm/*.json go")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end check (see the docstring)")
    args = parser.parse_args()
    command = "python benchmarks/llm.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="bench-llm-quick-"))
        dense, corpus = quick_inputs(scratch)
        results, out = args.results or scratch / "results", args.out or scratch / "runs"
        steps, batch, block, prompt, new = args.steps or 4, 4, 32, 16, 8
        print(f"--quick: model, corpus, runs and results in {scratch}", flush=True)
    else:
        dense, corpus = DENSE, CORPUS
        results, out = args.results or RESULTS, args.out or ROOT / "runs" / "bench-llm"
        steps, batch, block, prompt, new = args.steps or 120, 16, 256, 128, 32
    store = results / "llm"
    store.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()

    def write() -> str:
        text = render(load_rows(store, args.runs, args.methods, dense), command=command, cpu=cpu,
                      date=time.strftime("%Y-%m-%d"))
        (results / "llm.md").write_text(text)
        return text

    if not (dense / "config.json").is_file():
        print(f"{dense} not trained yet (samples/train_llm.py); nothing to run", flush=True)
    else:
        for run in args.runs:
            for method in args.methods:
                path = store / f"{tag(run, method)}.json"
                if path.is_file():
                    old = json.loads(path.read_text())
                    if old.get("status") == "ok" or not args.retry_failed:
                        continue
                cfg = recipe(run, method, model=dense, corpus=corpus, steps=steps, batch=batch, block=block,
                             prompt=prompt, new=new, threads=args.threads, quick=args.quick)
                row = run_one(run, method, cfg_dict=cfg, out=out / tag(run, method), command=command)
                row["quick"] = args.quick
                path.write_text(json.dumps(row, indent=1, default=str) + "\n")
                print(f"{path.stem}: {row['status']}" + (
                    f", perplexity {row['dense_ppl']:.3f} -> {row['ppl']:.3f}, decode "
                    f"x{row.get('decode_speedup') or math.nan:.2f}" if row["status"] == "ok" else ""), flush=True)
                write()
    print(write())
    print(f"results: {results / 'llm.md'} and {store}/", flush=True)


if __name__ == "__main__":
    main()
