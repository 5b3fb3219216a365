"""Memory of inspect and planning on a 1.5 B-parameter decoder LM (issue 34, Deliver 5): a Qwen2-1.5B-shaped model
(random weights: the shapes are what memory depends on) through what `compressor inspect --recipe` runs: the layer
table (one forward pass of model.input_shape tokens), the decoder structures, and the recipe's plan predicted on a
copy of the model (snapshot, scores, plan, removal).

    python benchmarks/llm_memory.py [--seq 256] [--target 0.7] [--kinds mlp kv_groups]

How it fits: a decoder LM is never traced (torch-pruning's graph would hold every intermediate); its structures are
scored from their weight slices, so planning needs the weights (fp32: 4 bytes per parameter) and, for the
prediction, a copy of them (predict_pruning removes on a copy, leaving the model as it was), plus one forward
pass's activations at the recipe's sequence length. The peak resident set size (ru_maxrss) is measured after each
step. Results: benchmarks/results/llm_memory.json and .md.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))  # benchmarks/transformers.py must not shadow the transformers package

from common import RESULTS  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--target", type=float, default=0.7, help="prune.target.macs of the predicted plan")
    parser.add_argument("--kinds", nargs="+", default=["mlp", "kv_groups"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from compressor.app.inspection import inspect_model, predict_target
    from compressor.app.recipe import recipe_from_dict
    from compressor.deploy.bench import environment
    from compressor.models.hf_causal_lm import HFCausalLM

    steps = []

    def step(name: str, started: float) -> None:
        steps.append({"step": name, "seconds": round(time.perf_counter() - started, 1),
                      "peak_rss_gib": round(peak_gib(), 2)})
        print(f"{name}: {steps[-1]['seconds']} s, peak RSS {steps[-1]['peak_rss_gib']} GiB", flush=True)

    start = time.perf_counter()
    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(config).eval()
    params = sum(p.numel() for p in hf.parameters())
    model = HFCausalLM(hf)
    step(f"build ({params / 1e9:.2f} B parameters, fp32)", start)
    recipe = recipe_from_dict({
        "name": "llm-memory", "task": "language-modeling",
        "model": {"arch": "hf:qwen2-1.5b-shaped", "inputs": "tokens", "input_shape": [args.seq]},
        "data": {"kind": "python", "factory": "unused:build"},
        "prune": {"method": "oneshot", "target": {"macs": args.target}, "decoder": {"kinds": args.kinds}}})
    start = time.perf_counter()
    report = inspect_model(model, recipe.model, label="Qwen2-1.5B-shaped")
    step("inspect (layer table, decoder structures)", start)
    start = time.perf_counter()
    prediction = predict_target(model, recipe)
    step("plan predicted on a copy (snapshot, magnitude scores, plan, removal)", start)
    result = {"model": "Qwen2-1.5B-shaped (random weights)", "parameters": params, "seq_len": args.seq,
              "fp32_weights_gib": round(params * 4 / 2 ** 30, 2), "target_macs": args.target, "kinds": args.kinds,
              "steps": steps, "structures": len(report.groups),
              "prediction": {k: v for k, v in (prediction or {}).items() if isinstance(v, (int, float, str))},
              "cpu": environment().get("cpu"), "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/llm_memory.py " + " ".join(sys.argv[1:])}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "llm_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Inspect and planning memory of a 1.5 B decoder LM\n",
             f"`{result['command']}` ({result['date']}, {result['cpu']}): {params / 1e9:.2f} B parameters "
             f"({result['fp32_weights_gib']} GiB of fp32 weights), {args.seq} tokens, prune.decoder.kinds "
             f"{args.kinds}, target macs {args.target}.\n", "| step | seconds | peak RSS (GiB) |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['seconds']} | {s['peak_rss_gib']} |" for s in steps]
    (args.results / "llm_memory.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
