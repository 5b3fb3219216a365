"""report.md sections of a language model's run (app/lm_deploy.py wrote what they show): the prefill / decode bench
of the ONNX files with their key/value caches, the dense, pruned and weight-only quantized files side by side, and
the save_pretrained folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.app.metric_change import change_text
from compressor.markdown import speedup_label, table


def is_lm_rows(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and rows[0].get("kind") == "language-model"


def _kb(n: Any) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def latency_section(r: dict[str, Any]) -> list[str]:
    """One table per backend: prefill ms and decode tokens/s of each file, with the speedups over dense."""
    rows = r.get("latency") or []
    first = rows[0]
    lines = ["## Latency (language model: ONNX with the key/value cache, "
             + ("dense and compressed timed in turn)" if first.get("dense") else "no dense model given)"), "",
             f"Prefill: one run of a {first['prompt_tokens']}-token prompt on an empty cache (median ms). Decode: "
             f"{first['new_tokens']} greedy tokens after it, one cached step each (tokens/s = {first['new_tokens']} / "
             "median time of the steps together). Batch 1, seeded random prompt.", ""]
    body = []
    for row in rows:
        named = [("dense fp32", row.get("dense"), None, None),
                 ("compressed fp32", row["compressed"], row.get("prefill_speedup"), row.get("decode_speedup"))]
        if row.get("quantized"):
            named.append((f"compressed {row['quantized_mode']}", row["quantized"], row.get("quantized_prefill_speedup"),
                          row.get("quantized_speedup")))
        for name, side, prefill_x, decode_x in named:
            if side is None:
                continue
            body.append([row["backend"], name, f"{side['prefill_ms']:.3f}",
                         "-" if prefill_x is None else speedup_label(prefill_x),
                         f"{side['decode_tokens_per_second']:.1f}", f"{side['decode_ms_per_token']:.3f}",
                         "-" if decode_x is None else speedup_label(decode_x), side.get("exporter") or "-"])
    lines += table(["backend", "model", "prefill ms", "prefill speedup", "decode tokens/s", "ms / token",
                    "decode speedup", "exporter"], body)
    realised = [x for x in rows if x.get("realised_ratio")]
    if realised:
        mac = r["dense"]["macs"] / r["compressed"]["macs"]
        lines += [f"MAC reduction x{mac:.2f} (a forward of one block); realised ratio = decode speedup / MAC "
                  f"reduction: " + ", ".join(f"{x['backend']} {x['realised_ratio']:.2f}" for x in realised) + ".", ""]
    lines += [f"- {x['note']}" for x in rows if x.get("note")]
    return lines + ([""] if any(x.get("note") for x in rows) else [])


def deployment_section(r: dict[str, Any]) -> list[str]:
    """Dense fp32, pruned fp32 and the weight-only quantized file: validation perplexity on ONNX Runtime, the
    change from dense, the file size and decode tokens/s."""
    q, dense, comp = r["quantized"], r["dense"], r["compressed"]
    task = r["task"]
    key = task["primary"]
    timed = [x for x in r.get("latency") or [] if x.get("quantized")]
    heads = [f"{x['backend']} decode tokens/s (speedup)" for x in timed]

    def cells(side: str) -> list[str]:
        out = []
        for x in timed:
            tps = x[side]["decode_tokens_per_second"]
            out.append(f"{tps:.1f} (x{tps / x['dense']['decode_tokens_per_second']:.2f})")
        return out

    onnx = comp.get(f"onnx_{key}", comp.get(key))
    w = q["weight_only"]
    rows = [["dense fp32", f"{dense[key]:.3f}", "", _kb(dense["onnx_bytes"]), *cells("dense")],
            ["pruned fp32", f"{onnx:.3f}", change_text(task, dense[key], onnx), _kb(comp["onnx_bytes"]),
             *cells("compressed")],
            [f"pruned {q['mode']}", "-" if q.get(key) is None else f"{q[key]:.3f}",
             change_text(task, dense[key], q.get(key)), _kb(q["bytes"]), *cells("quantized")]]
    lines = [f"## Deployment: dense, pruned and pruned {q['mode']} (weight-only)", ""]
    lines += table(["model", f"{task['label']} (ONNX Runtime, whole val set)", "vs dense", "file (with weights)",
                    *heads], rows)
    p = q["parity"]
    symmetric = "symmetric, " if w["symmetric"] else ""
    lines += [f"{q['mode']}: every MatMul's constant weight as {w['bits']}-bit {w['op']} ({symmetric}one scale per "
              f"{w['block_size']} weights along the input axis), activations and the key/value cache in float, no calibration. Checked against the fp32 PyTorch model on {p['samples']}: max abs diff "
              f"{p['max_abs_diff']:.3g}, allowed {p['allowed_abs_diff']:.3g} (atol {p['atol']:g} + rtol "
              f"{p['rtol']:g} x max |logit|, the stated tolerance of {w['bits']}-bit weights); top-1 agreement "
              f"{p['top1_agreement']:.4f}, greedy tokens {'the same' if p['same_greedy_tokens'] else 'differ'}.", ""]
    return lines


def hf_line(r: dict[str, Any]) -> list[str]:
    """Where the pruned model reloads without compressor (hf/), or why it does not."""
    saved = (r.get("exports") or {}).get("hf_pretrained")
    if not saved:
        return []
    if saved.get("written"):
        return [f"The pruned model as an ordinary Hugging Face folder: `{Path(saved['path']).name}/` "
                "(`AutoModelForCausalLM.from_pretrained` rebuilds it without compressor; its logits were checked, "
                f"max abs diff {saved['max_abs_diff']:.1e}).", ""]
    return [f"No Hugging Face folder (hf/): {saved['reason']}", ""]


def parity_title(r: dict[str, Any]) -> str:
    return "## Export parity (prefill and cached decode against PyTorch, seeded random prompts)"
