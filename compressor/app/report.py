"""The run report: report.json (everything, machine-readable), report.md (tables) and PNG plots (Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.app import lm_report
from compressor.app.metric_change import change_text
from compressor.markdown import number, speedup_label, table
from compressor import rundir


def method_class(r: dict[str, Any]):
    """The registered method class of a report (its report section and figures)."""
    from compressor.prune.methods import METHODS

    return METHODS.get(r["recipe"]["prune"]["method"])


def write_report(report: dict[str, Any], out: Path) -> None:
    """Plots first, then report.md, then report.json last (its presence marks a finished run)."""
    report["plots"] = write_plots(report, out)
    rundir.write_text(out / "report.md", render_markdown(report))
    rundir.write_json(out / "report.json", report)


# ---------------------------------------------------------------------------------------------- markdown
def _m(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def _kb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def render_markdown(r: dict[str, Any]) -> str:
    recipe = r["recipe"]
    lines = [f"# compressor report: {recipe['name']}", "", _summary_line(r), ""]
    lines += _accuracy_section(r)
    lines += [_target_line(r), ""]
    lines += _examples_section(r) + _native_section(r) + lm_report.hf_line(r)
    lines += method_class(r).report_section(r.get("method") or {})
    lines += _latency_target_section(r)
    lines += _latency_section(r) + _deployment_section(r) + _parity_section(r) + _fusion_section(r)
    lines += _round_to_section(r)
    lines += _widths_section(r)
    lines += _training_section(r)
    if r.get("gates"):
        lines += ["## Gates", ""]
        lines += table(["gate", "value", "limit", "passed"],
                        [[g["name"], f"{g['value']:.3f}", g["limit"], "yes" if g["passed"] else "**no**"] for g in r["gates"]])
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    env = r.get("environment") or {}
    if env:
        lines += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
    for name, path in (r.get("plots") or {}).items():
        if name != "examples":  # shown in its own section
            lines += [f"![{name}]({Path(path).name})", ""]
    return "\n".join(lines)


def _summary_line(r: dict[str, Any]) -> str:
    """Status, what was compressed (checkpoint, or the Python API's in-memory model and data), how, and with which
    loss and metric; a deploy() report says the model was pruned outside compress."""
    recipe, inputs = r["recipe"], r.get("inputs") or {}
    status = f"Status: **{r['status']}**."
    if r.get("training") is None:
        pruned = (f"pruned in the user's loop by a `compressor.Pruner` (method `{recipe['prune']['method']}`, host "
                  f"`{recipe['prune']['host']}`, target `{r['target']['asked'] or 'none'}`)" if r.get("method")
                  else "pruned outside compress")
        line = (f"{status} Model `{r['checkpoint']}` {pruned} and deployed with `compressor.deploy` (export, parity, "
                f"quantization, engine and bench of the given model); data: {inputs.get('data', 'none')}.")
    else:
        line = (f"{status} Checkpoint `{r['checkpoint']}`, method `{recipe['prune']['method']}` (host "
                f"`{recipe['prune']['host']}`), target `{r['target']['asked'] or 'none'}`, "
                f"{recipe['finetune']['epochs']} fine-tune epochs on `{inputs.get('data') or recipe['data']['kind']}`.")
        if inputs.get("loss") not in (None, "cross-entropy"):
            line += f" Training loss `{inputs['loss']}`."
    if inputs.get("metric"):
        line += (f" Metric `{inputs['metric']}` (the batch means averaged over the validation set; higher is better; "
                 "gates.max_metric_drop holds it).")
    return line


def task_info(r: dict[str, Any]) -> dict[str, Any]:
    """The run's task as the report records it (compressor/tasks: its primary metric and table columns);
    classification for reports written before tasks."""
    from compressor.tasks.classification import Classification

    return r.get("task") or Classification(0).describe()


def _examples_section(r: dict[str, Any]) -> list[str]:
    """The example predictions of a detection or segmentation run (plot_examples.png, drawn by app/examples.py)."""
    examples, plots = r.get("examples") or {}, r.get("plots") or {}
    if not examples or "examples" not in plots:
        return []
    models = " and ".join(f"the {m} model's" for m in examples["models"])
    shown = (f"boxes scoring above {examples['score_threshold']:g}, with class and score" if examples["task"] ==
             "detection" else "class masks, the background uncoloured; under each panel its pixel accuracy")
    images = ", ".join(str(i) for i in examples["indices"])
    return ["## Example predictions", "",
            f"Validation images {images} (a seeded choice): the ground truth, then {models} predictions ({shown}). "
            "report.json `examples` holds what the figure shows.", "",
            f"![examples]({Path(plots['examples']).name})", ""]


def _native_section(r: dict[str, Any]) -> list[str]:
    """The compressed model in its framework's own format (a YOLO model: Ultralytics' checkpoint)."""
    path = (r.get("artifacts") or {}).get("ultralytics")
    if not path:
        return []
    return [f"The compressed model in Ultralytics' format: `{Path(path).name}` (`ultralytics.YOLO(path)` predicts, "
            "validates, exports and trains it at its pruned widths; loading it needs compressor importable).", ""]


def _accuracy_section(r: dict[str, Any]) -> list[str]:
    """Dense and compressed accuracy (with the metric when one was given) and size; the dense row and the ratios only
    when there is a dense model (a deploy() without one has none), accuracy only with a validation set."""
    dense, comp = r.get("dense"), r["compressed"]
    has_metric = "metric" in comp
    columns = task_info(r)["columns"]

    def row(name: str, m: dict[str, Any]) -> list[str]:
        return [name, *(number(m.get(key), digits) for key, _, digits in columns),
                *([number(m.get("metric"), 4)] if has_metric else []), _m(m["macs"]), _m(m["params"]),
                _kb(m["onnx_bytes"]), _kb(m["onnx_zipped_bytes"])]

    def change(key: str, digits: int, unit: str) -> str:
        if dense.get(key) is None or comp.get(key) is None:
            return "-"
        if key == info["primary"] and not info.get("higher_is_better", True):  # perplexity: relative (+4.9%)
            return change_text(info, dense[key], comp[key])
        return f"{comp[key] - dense[key]:+.{digits}f}{unit}"

    info = task_info(r)
    rows = [row("dense", dense)] if dense else []
    rows.append(row("compressed", comp))
    if dense:
        rows.append(["ratio / change", *(change(key, digits, " pp") if key != "loss" else ""
                                         for key, _, digits in columns),
                     *([change("metric", 4, "")] if has_metric else []), f"{comp['macs'] / dense['macs']:.3f}",
                     f"{comp['params'] / dense['params']:.3f}", f"{comp['onnx_bytes'] / dense['onnx_bytes']:.3f}",
                     f"{comp['onnx_zipped_bytes'] / dense['onnx_zipped_bytes']:.3f}" if comp["onnx_zipped_bytes"]
                     else "-"])
    return ["## Accuracy and size", ""] + table(
        ["", *(label for _, label, _ in columns), *(["metric"] if has_metric else []), "MACs", "params", "ONNX file",
         "ONNX zipped"], rows)


def _target_line(r: dict[str, Any]) -> str:
    t, comp, task = r["target"], r["compressed"], task_info(r)
    onnx_top1 = f"{comp['onnx_' + task['primary']]:.2f}" if f"onnx_{task['primary']}" in comp else "-"
    if "onnx_metric" in comp:
        onnx_top1 += f" (metric {comp['onnx_metric']:.4f})"
    if t.get("achieved_macs_ratio") is None:
        return (f"No dense model was given, so no MAC ratio or speedup (pass dense_model= to deploy()). ONNX Runtime "
                f"{task['label']} of the exported model: {onnx_top1}.")
    if t.get("asked") is None:
        asked = "none (this method keeps dense shapes)" if r.get("training") is not None else "none (deploy)"
    elif t.get("asked_macs_ratio") is None:
        asked = "n/a (channel target)"
    else:
        asked = f"{t['asked_macs_ratio']:.3f}"
    return (f"MAC target: asked {asked} of dense, achieved {t['achieved_macs_ratio']:.3f} (MAC speedup "
            f"x{t['achieved_mac_speedup']:.2f}). ONNX Runtime {task['label']} of the exported model: {onnx_top1}.")


def _latency_section(r: dict[str, Any]) -> list[str]:
    rows = r.get("latency") or []
    if not rows:
        return []
    if lm_report.is_lm_rows(rows):  # prefill ms and decode tokens/s with the key/value cache
        return lm_report.latency_section(r)
    if not r.get("dense"):  # deploy() without a dense model: the slim model alone
        lines = ["## Latency (no dense model given, so no speedup)", ""]
        return lines + table(["backend", "batch", "p50 ms", "p90 ms", "throughput /s"],
                             [[x["backend"], x["batch_size"], f"{x['compressed']['p50']:.3f}",
                               f"{x['compressed']['p90']:.3f}", f"{x['compressed']['throughput']:.1f}"] for x in rows]
                             ) + _bench_inputs(rows) + _nms_latency(rows)
    mac_red = r["dense"]["macs"] / r["compressed"]["macs"]
    lines = ["## Latency (dense and compressed measured interleaved)", ""]
    lines += table(["backend", "batch", "dense p50 ms", "compressed p50 ms", "compressed p90 ms", "throughput /s",
                     "speedup", "MAC reduction", "realised ratio"],
                    [[x["backend"], x["batch_size"], f"{x['dense']['p50']:.3f}", f"{x['compressed']['p50']:.3f}",
                      f"{x['compressed']['p90']:.3f}", f"{x['compressed']['throughput']:.1f}", f"x{x['speedup']:.2f}",
                      f"x{mac_red:.2f}", f"{x['realised_ratio']:.2f}"] for x in rows])
    lines += ["Realised ratio = latency speedup / MAC reduction (1.0 means every removed MAC became time saved).", ""]
    lines += _bench_inputs(rows) + _nms_latency(rows)
    layout = r.get("ort_cpu_layout")
    if layout:
        def count(side: str) -> str:
            return f"{layout[side]['nchwc']} of {sum(layout[side].values())}"

        lines += [f"ONNX Runtime CPU runs {count('compressed')} convolutions of the compressed model in its fast NCHWc "
                  f"layout (dense: {count('dense')}); `compressor profile model.onnx --baseline dense.onnx` shows "
                  "where the time goes."] + [f"- {f}" for f in layout["findings"]] + [""]
    return lines


def _nms_parity(r: dict[str, Any]) -> list[str]:
    """export.nms: how model.nms.onnx's detections matched compressor's postprocess, and their mAP."""
    p = (r.get("parity") or {}).get("onnx_nms") or {}
    if "matched" not in p:
        return []
    scored = r["compressed"].get("onnx_nms_map50_95")
    return [f"model.nms.onnx (conf {p['conf']}, iou {p['iou']}, max_det {p['max_det']}): {p['file_detections']} "
            f"detections on {p['samples']} samples vs {p['detections']} from compressor's postprocess of the PyTorch "
            f"outputs; {p['matched']} matched (IoU > {p['match_iou']}), {p['edge_cases']} on a threshold's edge, "
            f"boxes within {p['max_box_relative_diff']:.2e} of their size, scores within {p['max_score_diff']:.2e}"
            + ("" if scored is None else f"; mAP50-95 of its own detections {scored:.2f} (mAP50 "
                                         f"{r['compressed']['onnx_nms_map50']:.2f})") + ".", ""] + _nms_engine_parity(r)


def _nms_engine_parity(r: dict[str, Any]) -> list[str]:
    """export.nms with a TensorRT engine: how model.nms.engine's (EfficientNMS_TRT) detections matched."""
    p = (r.get("parity") or {}).get("tensorrt_nms") or {}
    if "matched" not in p:
        return []
    return [f"model.nms.engine (TensorRT EfficientNMS_TRT, fp32): {p['file_detections']} detections on "
            f"{p['samples']} samples vs {p['detections']} from the PyTorch postprocess; {p['matched']} matched, "
            f"{p['edge_cases']} on a threshold's edge, boxes within {p['max_box_relative_diff']:.2e} of their size, "
            f"scores within {p['max_score_diff']:.2e}.", ""]


def _bench_inputs(rows: list[dict[str, Any]]) -> list[str]:
    """Which inputs the bench fed (a detector's validation images, else seeded random ones)."""
    used = (rows[0].get("inputs") or {}).get("description") if rows else None
    return [f"Inputs: {used}.", ""] if used else []


def _nms_latency(rows: list[dict[str, Any]]) -> list[str]:
    """export.nms: the raw model and the model with NMS in the graph (.nms.onnx), dense and compressed."""
    timed = [x for x in rows if x.get("nms")]
    if not timed:
        return []

    def cell(stats: Any) -> str:
        return "-" if stats is None else f"{stats['p50']:.3f}"

    def speedup(value: Any) -> str:
        return "-" if value is None else f"x{value:.2f}"

    lines = ["With NMS in the graph (model.nms.onnx, dense.nms.onnx: the detector as deployed):", ""]
    return lines + table(["backend", "batch", "dense p50 ms", "dense + NMS p50 ms", "compressed p50 ms",
                          "compressed + NMS p50 ms", "speedup", "speedup with NMS"],
                         [[x["backend"], x["batch_size"], cell(x["dense"]), cell(x["nms"]["dense"]),
                           cell(x["compressed"]), cell(x["nms"]["compressed"]), speedup(x["speedup"]),
                           speedup(x["nms"]["speedup"])] for x in timed])


def _latency_target_section(r: dict[str, Any]) -> list[str]:
    t = (r.get("target") or {}).get("latency")
    if not t:
        return []
    final = "not measured" if t.get("final_speedup") is None else (
        f"x{t['final_speedup']:.2f} ({'within' if t['final_met'] else '**not** within'} {t['tolerance']:.0%})")
    lines = [f"## Latency target: x{t['asked_speedup']:.2f} on {t['backend']} batch {t['batch']}", ""]
    tabled = t.get("planner") == "table"
    if t.get("table"):
        src = t["table"]
        lines += [f"{'Planned from' if tabled else 'Given'} the latency table `{src['path']}` ({src['layers']} "
                  f"layers matched; measured on {src.get('cpu')}, {src['backend']} batch {src['batch']}: the tabled "
                  f"layers {src['layers_ms']:.3f} ms of the model's {src.get('model_p50_ms') or 0:.3f} ms end to "
                  "end, the rest held fixed)" + (": channels ranked by importance per millisecond, each group keeping "
                  "only the widths where its measured latency steps down." if tabled else
                  ": it predicts the chosen plan per layer below; the plan is the MAC ranking's."), ""]
        if t.get("choice"):
            lines += [f"Choice of plan: {t['choice']} (the MAC ranking's plan is kept whenever it reaches the "
                      "speedup; the table's where it does not).", ""]
    if t.get("open_loop"):
        lines += [f"The table was measured on another machine, so the plan is its prediction "
                  f"({speedup_label(t['tries'][0]['predicted_speedup'])}, {t['achieved_macs']:.3f} of the MACs) "
                  "and nothing was measured here; on the device: `compressor bench model.onnx --baseline "
                  "dense.onnx`.", ""]
        return lines
    budget = "predicted-latency fraction" if tabled else "MAC fraction"
    lines += [f"Measured before fine-tuning (magnitude plan on a copy, dense and pruned interleaved), the {budget} "
              f"was moved until the speedup was within {t['tolerance']:.0%}; the run then planned to {t['macs']:.3f}"
              f"{' of the predicted dense latency' if tabled else ' of the dense MACs'}. After fine-tuning the bench "
              f"measured {final}.", ""]
    with_table = bool(t.get("table"))
    head = ["try", *(["planner"] if with_table else []), "budget asked" if with_table else "MACs asked", "MACs",
            *(["predicted"] if with_table else []), "dense ms", "pruned ms", "measured"]
    lines += table(head, [[i + 1, *([x.get("planner", "table")] if with_table else []), f"{x['asked_macs']:.3f}",
                           f"{x['macs']:.3f}", *([speedup_label(x['predicted_speedup'])] if with_table else []),
                           f"{x['dense_ms']:.3f}", f"{x['pruned_ms']:.3f}", f"x{x['speedup']:.2f}"]
                          for i, x in enumerate(t["tries"])])
    layers = t.get("layers") or []
    if layers:
        measured = any(x.get("measured_ms") is not None for x in layers)
        lines += ["", "Where the time goes: the table's prediction for the chosen plan, largest dense layers first"
                  + ("; measured: each pruned layer timed alone as the table times it, at its real kept input and "
                     "output widths" if measured else "") + " (per node in the whole model: `compressor profile "
                  "model.onnx --baseline dense.onnx`).", ""]
        lines += table(["layer", "width", "dense ms", "pruned ms predicted", *(["measured"] if measured else [])],
                       [[x["name"], f"{x['dense_out']} -> {x['kept_out']}", f"{x['dense_ms']:.3f}",
                         f"{x['pruned_ms']:.3f}", *([_ms(x.get("measured_ms"))] if measured else [])]
                        for x in layers[:12]])
        if measured:
            pred = sum(x["pruned_ms"] for x in layers if x.get("measured_ms") is not None)
            real = sum(x["measured_ms"] for x in layers if x.get("measured_ms") is not None)
            lines += ["", f"All tabled layers: predicted {pred:.3f} ms, measured {real:.3f} ms "
                          f"({(pred - real) / real:+.0%})." if real > 0 else ""]
    return lines


def _ms(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _deployment_section(r: dict[str, Any]) -> list[str]:
    """Dense fp32, pruned fp32 and the quantized file side by side: accuracy on the whole validation set and
    latency from the same round-robin bench."""
    q = r.get("quantized")
    if not q or not r.get("dense"):  # deploy() without a dense model: the parity and notes sections say the rest
        return []
    if q.get("weight_only"):  # a language model's MatMulNBits file
        return lm_report.deployment_section(r)
    dense, comp = r["dense"], r["compressed"]
    timed = [x for x in r.get("latency") or [] if "quantized" in x]
    heads = [f"{x['backend']} b{x['batch_size']} ms (speedup)" for x in timed]

    def cells(key: str) -> list[str]:
        return [f"{x[key]['p50']:.3f} (x{x['dense']['p50'] / x[key]['p50']:.2f})" for x in timed]

    task = task_info(r)
    key, label = task["primary"], f"{task['label']} {task['unit']}".strip()
    onnx = comp.get(f"onnx_{key}", comp[key])
    rows = [["dense fp32", f"{dense[key]:.2f}", "", _kb(dense["onnx_bytes"]), *cells("dense")],
            ["pruned fp32", f"{onnx:.2f}", f"{onnx - dense[key]:+.2f}", _kb(comp["onnx_bytes"]),
             *cells("compressed")],
            [f"pruned {q['mode']}", f"{q[key]:.2f}", f"{q[key] - dense[key]:+.2f}", _kb(q["bytes"]),
             *cells("quantized")]]
    lines = [f"## Deployment: dense, pruned and pruned {q['mode']}", ""]
    lines += table(["model", f"{label} (ONNX Runtime, whole val set)", "vs dense points", "file", *heads], rows)
    settings = q.get("settings") or {}
    if settings:
        lines += [f"INT8: static QDQ, {settings['calibration']} calibration on {settings['calibration_samples']} "
                  f"training samples, per-channel weights {settings['per_channel']}, {settings['activations']} "
                  f"activations, reduce_range {settings['reduce_range']} ({settings['why']}).", ""]
    p = q["parity"]
    agreement = ("" if p.get("top1_agreement") is None else
                 f"top-1 agreement {p['top1_agreement']:.4f} (required {p['min_top1_agreement']}), ")
    lines += [f"Parity vs the fp32 PyTorch model on {p['samples']} validation samples: {agreement}"
              f"max abs diff {p['max_abs_diff']:.3g} "
              f"(allowed {p['rtol']:g} x max |output| = {p['allowed_abs_diff']:.3g}). Layers kept in float: "
              f"{', '.join(q.get('float_layers') or []) or 'none'}.", ""]
    if q.get("qat"):
        t = q["qat"]
        lines += [f"Quantization-aware fine-tuning: post-training int8 gave {task['label']} "
                  f"{t[f'post_training_{key}']:.2f}{task['unit']}; {t['epochs']} epoch(s) with "
                  f"{t['fake_quantized_layers']} layers fake-quantized (lr {t['lr']:g}) gave {q[key]:.2f}"
                  f"{task['unit']}. The int8 file comes from the QAT weights; "
                  "model.onnx and the slim model "
                  "are the fp32 pruned model.", ""]
    if q.get("auto_tries"):
        lines += ["`exclude: auto` (the most harmful layers first, by the sensitivity scan):", ""]
        lines += table(["float layers", label, "drop from dense points"],
                        [[len(t["excluded"]), f"{t[key]:.2f}",
                          "-" if t["drop_pp"] is None else f"{t['drop_pp']:+.2f}"] for t in q["auto_tries"]])
    if q.get("sensitivity"):
        lines += ["Most sensitive layers (each quantized alone; agreement with fp32):", ""]
        lines += table(["layer", "top-1 agreement", "max diff / max |output|"],
                        [[s["module"] or s["node"], f"{s['top1_agreement']:.4f}", f"{s['relative_diff']:.3g}"]
                         for s in q["sensitivity"][:5]])
    return lines


def _parity_section(r: dict[str, Any]) -> list[str]:
    parity = r.get("parity") or {}
    rows = [[name, p.get("precision", "fp32"), p.get("samples", "-"), f"{p['max_abs_diff']:.2e}" if "max_abs_diff" in p else "-",
             f"{p['mean_abs_diff']:.2e}" if "mean_abs_diff" in p else "-",
             f"{p['top1_agreement']:.4f}" if p.get("top1_agreement") is not None else "-",
             f"{p['allowed_abs_diff']:.2e}" if "allowed_abs_diff" in p else p.get("atol", "-"),
             "yes" if p.get("passed") else "**no**"] for name, p in parity.items()]
    trt = (r.get("exports") or {}).get("tensorrt") or {}
    real = r["compressed"].get(task_info(r)["primary"]) is not None  # deploy() without a validation set: random inputs
    lines = [f"## Export parity ({'real validation samples' if real else 'seeded random inputs: no validation set'})",
             ""] if not r.get("task", {}).get("name") == "language-modeling" else [lm_report.parity_title(r), ""]
    lines += table(["artifact", "precision", "samples", "max abs diff", "mean abs diff", "top-1 agreement",
                     "allowed diff (atol + rtol x max |output|)", "passed"], rows)
    if trt.get("status") in ("skipped", "disabled"):
        lines += [f"TensorRT engine: {trt['status']}{': ' + trt['reason'] if trt.get('reason') else ''}.", ""]
    lines += _nms_parity(r)
    compat = (r.get("exports") or {}).get("tensorrt_compatibility")
    if compat:
        verdict = "compatible" if compat["compatible"] else "**not compatible**"
        lines += [f"Static TensorRT {compat['tensorrt_major']} compatibility of model.onnx (opset {compat['opset']}): "
                  f"{verdict}.", ""]
        if compat["findings"]:
            lines += table(["node", "op", "level", "reason"],
                            [[f["node"], f["op"], f["level"], f["reason"]] for f in compat["findings"]])
    return lines


def _fusion_section(r: dict[str, Any]) -> list[str]:
    """The transformer optimizer's fused operators, dense vs compressed (deploy/ort_fusion.py)."""
    fusion = (r.get("exports") or {}).get("ort_fusion")
    if not fusion:
        return []
    lines = [f"## ONNX Runtime transformer fusions (optimizer model type `{fusion.get('model_type', '?')}`)", ""]
    if "error" in fusion:
        return lines + [f"Not counted: {fusion['error']}", ""]
    ops = sorted(set(fusion["dense"]) | set(fusion["compressed"]))
    rows = [[op, fusion["dense"].get(op, 0), fusion["compressed"].get(op, 0)] for op in ops]
    lines += table(["fused operator", "dense", "compressed"], rows) if rows else ["No fusion in either export.", ""]
    if "Attention" not in ops and "MultiHeadAttention" not in ops:
        lines += ["No attention fusion in either export (the dense one included), so pruning did not break one.", ""]
    return lines


def _round_to_section(r: dict[str, Any]) -> list[str]:
    chosen = r.get("round_to") or {}
    if not chosen.get("value"):
        return []
    lines = ["## Channel multiple (prune.round_to)", "",
             f"Kept widths are multiples of {chosen['value']} or the dense width"
             + (" (`auto`: a layer narrower than twice that keeps the largest power of two it can still lose)"
                if chosen.get("auto") else "") + (f". Chosen: {chosen['reason']}." if chosen.get("reason") else "."), ""]
    rows = chosen.get("rows") or []
    if rows:
        batches = [k for k in rows[0] if k.startswith("ms_b")]
        lines += table(["round_to", "MACs kept", *[f"ms batch {k[4:]}" for k in batches], "score ms"],
                        [[row["round_to"], f"{row['macs']:.3f}", *[f"{row[k]:.3f}" for k in batches],
                          f"{row['score_ms']:.3f}"] for row in rows])
    return lines


def _widths_section(r: dict[str, Any]) -> list[str]:
    after = r["compressed"].get("widths") or {}
    if not r.get("dense"):  # deploy() without a dense model
        return ["## Per-layer widths", ""] + table(["layer", "width"], [[n, w] for n, w in after.items()
                                                                         if not _is_norm(n)])
    before = r["dense"].get("widths") or {}
    rows = [[name, w, after.get(name, "-"), f"{after.get(name, 0) / w:.2f}"] for name, w in before.items()
            if not _is_norm(name)]
    return ["## Per-layer widths", ""] + table(["layer", "dense", "compressed", "kept"], rows)


def _is_norm(name: str) -> bool:
    """A normalisation layer's name (its width follows the layer before it)."""
    return "norm" in name.lower() or name.split(".")[-1].startswith("bn")


def _training_section(r: dict[str, Any]) -> list[str]:
    training = r.get("training") or {}
    history, recalibrated = training.get("history") or [], training.get("bn_recalibration")
    lines = []
    if history:
        has_metric = any("val_metric" in h for h in history)
        task = task_info(r)
        rows = [[h["epoch"], f"{h['train_loss']:.4f}", f"{h.get('val_' + task['primary'], float('nan')):.2f}",
                 *([number(h.get("val_metric"), 4)] if has_metric else []), f"{h['lr']:.5f}", h.get("params", "-"),
                 f"{h['seconds']:.1f}"] for h in history]
        lines += ["## Fine-tuning", ""] + table(["epoch", "train loss", f"val {task['label']} {task['unit']}".strip(),
                                                 *(["val metric"] if has_metric else []), "lr", "params", "seconds"],
                                                rows)
    if recalibrated:
        lines += ["" if lines else "## Fine-tuning", "",
                  f"Batch-norm statistics of {recalibrated['layers']} layers re-estimated on "
                  f"{recalibrated['samples']} training samples after the last pruning change "
                  "(finetune.bn_recalibration); the compressed model's top-1 above is measured after it.", ""]
    return lines


# ---------------------------------------------------------------------------------------------- plots
class _Figures:
    """The part of pyplot the report's figures use (`subplots`), on matplotlib's Figure objects: no pyplot, so the
    process's matplotlib backend and pyplot's list of open figures stay as the caller had them (the PNGs are drawn
    by the Agg canvas that savefig picks for the format)."""

    @staticmethod
    def subplots(*args: Any, figsize: Any = None, **kwargs: Any):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)


def write_plots(r: dict[str, Any], out: Path) -> dict[str, str]:
    plt = _Figures()  # what the drawing functions and each method's figures() receive as `plt`
    figures = {name: draw(plt, r) for name, draw in (("widths", _plot_widths), ("training", _plot_training),
                                                     ("latency", _plot_latency))}
    figures.update(method_class(r).figures(r.get("method") or {}, plt))
    written = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        path = out / f"plot_{name}.png"
        with rundir.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        written[name] = str(path)
    figure = (r.get("examples") or {}).get("figure")
    if figure and (out / figure).is_file():  # drawn by the pipeline from the images (app/examples.py)
        written["examples"] = str(out / figure)
    return written


def _plot_widths(plt, r):
    """Kept channels per layer, or per block for a model with more than 40 layers (app/width_groups.py)."""
    from compressor.app.width_groups import draw_widths, group_widths

    before, after = (r.get("dense") or {}).get("widths") or {}, r["compressed"].get("widths") or {}
    groups = group_widths(before, after, exclude=_is_norm)
    return draw_widths(plt, groups, has_dense=bool(before)) if groups else None


def _plot_training(plt, r):
    history = (r.get("training") or {}).get("history") or []
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    task = task_info(r)
    key, label = task["primary"], f"{task['label']} {task['unit']}".strip()
    if any(f"val_{key}" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get(f"val_{key}") for h in history], "s-", color="#e67e22", label=f"val {label}")
        ax2.axhline(r["dense"][key], color="#e67e22", ls="--", lw=1, label=f"dense {task['label']}")
        ax2.set_ylabel(label)
        ax2.legend(loc="center right")
    for event in (r.get("method") or {}).get("events") or []:
        ax.axvline(event.get("epoch", 0), color="grey", ls=":", lw=1)
    ax.legend(loc="upper right")
    ax.set_title("Fine-tuning (dotted: pruning events)")
    return fig


def _plot_latency(plt, r):
    rows = r.get("latency") or []
    if not rows:
        return None
    if lm_report.is_lm_rows(rows):
        return _plot_lm_latency(plt, rows)
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        named = [("dense", row.get("dense_ms")), ("compressed", row["compressed_ms"]),
                 (row.get("quantized_mode", ""), row.get("quantized_ms"))]
        named = [(name, ms) for name, ms in named if ms]  # no dense series under deploy() without a dense model
        ax.boxplot([ms for _, ms in named], showfliers=False)
        ax.set_xticks(range(1, len(named) + 1), [name for name, _ in named])
        ax.set_title(f"{row['backend']} batch {row['batch_size']}\n{speedup_label(row.get('speedup'))}", fontsize=9)
        ax.set_ylabel("ms")
    fig.suptitle("Latency distributions (dense and compressed interleaved)", y=1.03)
    fig.tight_layout()
    return fig


def _plot_lm_latency(plt, rows):
    """A language model's decode time per token (each timed run's steps together / new tokens), per backend."""
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        named = [(name, row.get(side)) for name, side in (("dense", "dense"), ("compressed", "compressed"),
                                                          (row.get("quantized_mode", ""), "quantized"))]
        named = [(name, side) for name, side in named if side]
        ax.boxplot([[v / row["new_tokens"] for v in side["decode"]["values"]] for _, side in named], showfliers=False)
        ax.set_xticks(range(1, len(named) + 1), [name for name, _ in named])
        ax.set_title(f"{row['backend']} decode\n{speedup_label(row.get('speedup'))} tokens/s", fontsize=9)
        ax.set_ylabel("ms per token")
    fig.suptitle("Decode time per token (key/value cache; models timed in turn)", y=1.03)
    fig.tight_layout()
    return fig
