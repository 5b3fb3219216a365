"""The deployment half of `compress` (and `compressor export` / `eval`) for causal language models (task:
language-modeling): the pruned model as an ordinary Hugging Face folder (hf/), ONNX with its key/value cache
(compressor/deploy/lm_export.py) for the compressed and the dense model alike, the cached decode checked against
PyTorch at two prompt lengths, weight-only int8 / int4 MatMulNBits copies, the validation perplexity of every file
on ONNX Runtime, and the prefill ms / decode tokens-per-second bench of the files timed in turn
(compressor/deploy/lm_bench.py).

The run directory holds model.onnx and dense.onnx (with model.onnx.data / dense.onnx.data when the exporter writes
the weights beside the graph), model.int8.onnx or model.int4.onnx, hf/ and tokenizer/. Both ONNX files come from
the same exporter (onnxruntime-genai's model builder where the compressed model is an ordinary config, torch.onnx
for per-layer widths), so the bench compares the pruning, not two attention kernels.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from compressor.errors import ParityError, RecipeError
from compressor.progress import info

if TYPE_CHECKING:
    from compressor.app.pipeline import RunState

PARITY_STEPS = 4  # cached greedy decode steps after each prompt
PARITY_LENGTHS = (8, 32)  # prompt lengths (capped by the model's positions)
PARITY_RTOL = 1e-3  # fp32 KV-cache decode: the graph's fused attention and ONNX Runtime's reductions round differently
# weight-only quantization is checked against the fp32 PyTorch logits with a tolerance of its own (times max
# |logit|): 8-bit weights move a random-init Llama's logits by under 1% of their range, 4-bit ones by about 13%
WEIGHT_ONLY_RTOL = {"int8": 0.05, "int4": 0.25}
QUANT_BLOCK = 32  # MatMulNBits: one scale per 32 weights along the input axis
WEIGHT_ONLY_BITS = {"int8": 8, "int4": 4}
EVAL_BATCH = 8  # blocks per ONNX Runtime run when scoring a file


def is_language_model(state_or_task: Any) -> bool:
    task = getattr(state_or_task, "task", state_or_task)
    return getattr(task, "name", None) == "language-modeling"


# ---------------------------------------------------------------------------------------------- checks
def positions(model: Any) -> Optional[int]:
    """The positions the model embeds (config.max_position_embeddings / n_positions), None when unbounded."""
    config = getattr(getattr(model, "hf", model), "config", None)
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def check_lengths(recipe: Any, model: Any) -> None:
    """RecipeError before any training when the bench's prompt + generated tokens exceed the model's positions."""
    limit = positions(model)
    prompt, new = recipe.bench.lm_lengths
    if limit is not None and prompt + new > limit and recipe.bench.backends:
        raise RecipeError(f"bench.prompt_tokens {prompt} + bench.new_tokens {new} = {prompt + new} tokens, but the "
                          f"model embeds at most {limit} positions (max_position_embeddings).",
                          hint=f"Set bench.prompt_tokens and bench.new_tokens so that they add up to at most {limit}.")


def parity_lengths(model: Any) -> tuple[int, ...]:
    """Two prompt lengths whose prompt + PARITY_STEPS cached steps fit the model's positions."""
    limit = positions(model)
    if limit is None:
        return PARITY_LENGTHS
    room = max(2, limit - PARITY_STEPS)
    return tuple(sorted({max(1, min(n, room)) for n in (min(PARITY_LENGTHS[0], room // 2), PARITY_LENGTHS[1])}))


# ---------------------------------------------------------------------------------------------- tokenizer, hf/
def run_tokenizer(train_set: Any, checkpoint: Optional[str]) -> Any:
    """The model's tokenizer: the training corpus's (TokenBlocks.tokenizer), else the one in the hf:DIR folder or
    the run's tokenizer/ folder; None when there is none (the export then takes torch.onnx, said in its note)."""
    from compressor.deploy.lm_export import has_tokenizer
    from compressor.train.text import TOKENIZER_DIR, root_dataset

    tokenizer = getattr(root_dataset(train_set), "tokenizer", None) if train_set is not None else None
    if tokenizer is not None:
        return tokenizer
    ref = str(checkpoint or "")
    candidates = [Path(ref[3:]).expanduser()] if ref.startswith("hf:") else [
        Path(ref) / TOKENIZER_DIR, Path(ref).parent / TOKENIZER_DIR]
    for folder in candidates:
        if has_tokenizer(folder):
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def save_lm_folders(state: "RunState") -> dict[str, Any]:
    """tokenizer/ (when the model has one) and hf/: the pruned model with save_pretrained, its config made to
    describe its widths (models/decoder.config_after), checked to reload with from_pretrained and give the same
    logits. Per-layer widths (or a config that cannot hold them) write no hf/; the reason goes to the notes and
    report.exports.hf_pretrained."""
    from compressor.app.pipeline import save_hf_folder
    from compressor.models.hf_causal_lm import save_pretrained_checked

    tokenizer = run_tokenizer(state.train_set, state.checkpoint)
    state.lm_tokenizer = tokenizer
    saved = save_hf_folder(state, tokenizer, save_pretrained_checked)
    pretrained = state.hf_pretrained
    if pretrained["written"]:
        info(f"      hf/: save_pretrained folder, reloaded with from_pretrained (max logit diff "
             f"{pretrained['max_abs_diff']:.1e})")
    else:
        state.notes.append(f"no save_pretrained folder (hf/): {pretrained['reason']}")
        info(f"      note: {state.notes[-1]}")
    return saved


# ---------------------------------------------------------------------------------------------- ONNX files
def move_onnx(source: Path, target: Path) -> None:
    """Move an ONNX graph and its external-data file (`<graph>.data`) to `target` and `<target>.data`, pointing the
    graph's tensors at the new data file's name (its tensors are not loaded)."""
    import onnx

    from compressor.deploy.export import data_file

    source, target = Path(source), Path(target)
    proto = onnx.load(str(source), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    if len(locations) > 1:
        raise RecipeError(f"{source.name} keeps its weights in {len(locations)} files; compressor moves a graph with "
                          "at most one external-data file.")
    data_file(target).unlink(missing_ok=True)
    if locations:
        (old,) = locations
        shutil.move(str(source.parent / old), str(data_file(target)))
        for tensor in external:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_file(target).name
        onnx.save(proto, str(target))
        source.unlink()
    else:
        shutil.move(str(source), str(target))


def _file_info(path: Path, exported: Any) -> dict[str, Any]:
    from compressor.deploy.export import data_file, onnx_bytes

    return {"path": str(path), "bytes": onnx_bytes(path), "zipped_bytes": None, "opset": exported.opset,
            "exporter": exported.exporter, "method": exported.method, "kv_cache": True,
            "kv_shapes": [list(s) for s in exported.kv_shapes], "note": exported.note,
            "external_data": data_file(path).name if data_file(path).is_file() else None}


def export_pair(model: Any, dense_model: Any, out: Path, tokenizer: Any = None
                ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """out/model.onnx of `model` and out/dense.onnx of `dense_model` (None: none) with their key/value caches, the
    dense one by the exporter the compressed one took. Returns their export records."""
    from compressor.deploy.lm_export import export_causal_lm

    with tempfile.TemporaryDirectory(prefix=".lm-export-", dir=out) as tmp:
        work = Path(tmp)
        exported = export_causal_lm(model.hf, work / "model", tokenizer=tokenizer)
        move_onnx(exported.fp32_path, out / "model.onnx")
        onnx_info = _file_info(out / "model.onnx", exported)
        dense_info = None
        if dense_model is not None:
            dense = export_causal_lm(dense_model.hf, work / "dense", tokenizer=tokenizer, method=exported.method)
            move_onnx(dense.fp32_path, out / "dense.onnx")
            dense_info = _file_info(out / "dense.onnx", dense)
    info(f"      model.onnx{' and dense.onnx' if dense_info else ''} with the key/value cache ({exported.exporter})")
    return onnx_info, dense_info


def export_stage(state: "RunState") -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """save_and_export's ONNX step for a language model: export_pair, with the exporter's note in the run's notes."""
    onnx_info, dense_info = export_pair(state.model, state.dense_model, state.out, getattr(state, "lm_tokenizer", None))
    if onnx_info.get("note"):
        state.notes.append(f"model.onnx{' and dense.onnx' if dense_info else ''}: {onnx_info['note']}")
        info(f"      note: {state.notes[-1]}")
    return onnx_info, dense_info


# ---------------------------------------------------------------------------------------------- scoring
def evaluate_lm_onnx(path: Path, dataset: Any, task: Any, *, batch_size: int = EVAL_BATCH,
                     backend: str = "ort-cpu") -> dict[str, float]:
    """The task's metrics (perplexity, NLL, token accuracy) of an ONNX causal LM with a key/value cache: each block
    of `dataset` run as one prompt on an empty cache, its logits scored by the task's evaluator, as the PyTorch
    model's are."""
    from compressor.deploy.lm_session import LMSession
    from compressor.train.data import make_loader

    session = LMSession.open(path, backend)
    evaluator = task.evaluator()
    try:
        for ids, targets in make_loader(dataset, batch_size, shuffle=False, workers=0):
            logits, _ = session.run(ids.numpy(), session.empty_cache(int(ids.shape[0])))
            evaluator.update(torch.from_numpy(np.asarray(logits, dtype=np.float32)), targets)
    finally:
        session.close()
    return evaluator.compute()


def _parity(model: Any, path: Path, *, rtol: float, atol: float, precision: str) -> dict[str, Any]:
    from compressor.deploy.lm_export import verify_kv_parity

    lengths = parity_lengths(model)
    result = verify_kv_parity(model.hf, path, prompt_lengths=lengths, steps=PARITY_STEPS, rtol=rtol, atol=atol)
    return {**result, "precision": precision,
            "samples": f"{len(lengths)} seeded prompts ({', '.join(map(str, lengths))} tokens), {PARITY_STEPS} "
                       "cached decode steps each"}


def _failed(state: "RunState", name: str, exc: ParityError) -> None:
    from compressor.app.pipeline import _finish

    state.report["status"] = "failed: parity"
    state.report.setdefault("parity", {})[name] = {"passed": False, "error": exc.render()}
    _finish(state.report, state.out, state.timer)


def verify_stage(state: "RunState") -> None:
    """model.onnx's prefill and cached decode against PyTorch at two prompt lengths (ParityError after writing the
    report), then its perplexity on the whole validation set (report.compressed.onnx_perplexity, ...)."""
    recipe, report, out = state.recipe, state.report, state.out
    rtol = max(recipe.verify.rtol, PARITY_RTOL)
    try:
        with state.timer("verify"):
            report["parity"] = {"onnx": _parity(state.model, out / "model.onnx", rtol=rtol, atol=recipe.verify.atol,
                                                precision="fp32")}
    except ParityError as exc:
        _failed(state, "onnx", exc)
        raise
    p = report["parity"]["onnx"]
    info(f"      model.onnx: prefill + cached decode within {p['max_abs_diff']:.2e} of PyTorch (allowed "
         f"{p['allowed_abs_diff']:.2e}), greedy tokens {'the same' if p['same_greedy_tokens'] else 'differ'}")
    if state.val_set is not None:
        with state.timer("verify"):
            scored = evaluate_lm_onnx(out / "model.onnx", state.val_set, state.task)
        for key, _, _ in state.task.columns:
            if key in scored and key != "loss":
                report["compressed"][f"onnx_{key}"] = scored[key]


def quantize_stage(state: "RunState") -> None:
    """export.quantize int8 / int4 for a language model: model.int8.onnx / model.int4.onnx with 8- / 4-bit
    MatMul weights (MatMulNBits, activations float, no calibration), its cached decode checked against the fp32
    PyTorch model with WEIGHT_ONLY_RTOL, its perplexity measured on the validation set."""
    from compressor.deploy.export import remove_onnx
    from compressor.deploy.lm_export import quantize_weights

    mode = state.recipe.export.quantize.mode
    report, out, key = state.report, state.out, state.task.primary
    path = out / f"model.{mode}.onnx"
    info(f"      quantizing model.onnx's MatMul weights to {WEIGHT_ONLY_BITS[mode]} bits (MatMulNBits)")
    with state.timer("quantize"):
        quantize_weights(out / "model.onnx", path, WEIGHT_ONLY_BITS[mode], block_size=QUANT_BLOCK)
        try:
            parity = _parity(state.model, path, rtol=WEIGHT_ONLY_RTOL[mode], atol=state.recipe.verify.atol,
                             precision=mode)
        except ParityError as exc:
            remove_onnx(path)  # not left looking like a verified export
            _failed(state, mode, exc)
            raise
        scored = evaluate_lm_onnx(path, state.val_set, state.task) if state.val_set is not None else {}
    from compressor.deploy.export import onnx_bytes

    report["quantized"] = {"mode": mode, "path": str(path), "bytes": onnx_bytes(path), "parity": parity,
                           "metric_key": key, **{k: scored[k] for k in ("perplexity", "loss", "token_acc")
                                                 if k in scored},
                           "weight_only": {"op": "MatMulNBits", "bits": WEIGHT_ONLY_BITS[mode],
                                           "block_size": QUANT_BLOCK, "symmetric": True, "activations": "float32",
                                           "rtol": WEIGHT_ONLY_RTOL[mode]}}
    report["parity"][mode] = parity
    report["artifacts"][mode] = str(path)
    from compressor.app.metric_change import metric_text

    shown = metric_text(state.task, scored[key]) + ", " if key in scored else ""
    info(f"      {mode} ONNX: {shown}logits within {parity['relative_diff'] or 0:.2e} of max |logit| "
         f"(allowed {WEIGHT_ONLY_RTOL[mode]:g})")


# ---------------------------------------------------------------------------------------------- bench
def _side(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("model", "exporter", "layers", "prefill_ms", "decode_tokens_per_second",
                                   "decode_ms_per_token", "prefill", "decode")}


def bench_rows(recipe: Any, out: Path, *, dense: bool, macs: Optional[float] = None,
               dense_macs: Optional[float] = None) -> tuple[list[dict[str, Any]], list[str]]:
    """bench_lms of dense.onnx (when `dense`), model.onnx and the quantized file, timed in turn on every ONNX
    Runtime backend of bench.backends at bench.prompt_tokens / new_tokens, as report rows: prefill ms and decode
    tokens/s of each, `speedup` the decode tokens/s speedup (what gates.min_speedup and a tokens_per_second_speedup
    target read). Returns the rows and notes on backends it did not time."""
    from compressor.deploy.lm_bench import bench_lms

    cfg, q = recipe.bench, recipe.export.quantize
    prompt, new = cfg.lm_lengths
    files = ([out / "dense.onnx"] if dense else []) + [out / "model.onnx"]
    quantized = q.mode if q.enabled and (out / f"model.{q.mode}.onnx").is_file() else None
    if quantized:
        files.append(out / f"model.{quantized}.onnx")
    rows, notes = [], []
    for backend in cfg.backends:
        if not backend.startswith("ort-"):
            notes.append(f"bench backend {backend}: a language model is timed as an ONNX file with its key/value "
                         "cache on ONNX Runtime (ort-* backends); not timed on it")
            continue
        result = bench_lms(files, prompt_tokens=prompt, new_tokens=new, backend=backend, threads=cfg.threads,
                           warmup_ms=cfg.warmup_ms, min_runs=cfg.min_runs, min_seconds=cfg.min_seconds)
        timed = result["results"]
        c = timed[1 if dense else 0]
        row = {"backend": backend, "batch_size": 1, "kind": "language-model", "measure": "decode tokens/s",
               "prompt_tokens": prompt, "new_tokens": new, "dense": _side(timed[0]) if dense else None,
               "compressed": _side(c), "speedup": c["decode_speedup"] if dense else None,
               "decode_speedup": c["decode_speedup"] if dense else None,
               "prefill_speedup": c["prefill_speedup"] if dense else None, "realised_ratio": None,
               "note": result.get("note")}
        if dense and macs and dense_macs:
            row["realised_ratio"] = row["speedup"] / (dense_macs / macs)
        line = f"      {backend}: prefill {prompt} tokens "
        if dense:
            line += (f"{timed[0]['prefill_ms']:.2f} -> {c['prefill_ms']:.2f} ms (x{c['prefill_speedup']:.2f}), decode "
                     f"{timed[0]['decode_tokens_per_second']:.1f} -> {c['decode_tokens_per_second']:.1f} tokens/s "
                     f"(x{c['decode_speedup']:.2f})")
        else:
            line += f"{c['prefill_ms']:.2f} ms, decode {c['decode_tokens_per_second']:.1f} tokens/s"
        if quantized:
            qr = timed[-1]
            row.update(quantized=_side(qr), quantized_mode=quantized,
                       quantized_speedup=qr["decode_speedup"] if dense else None,
                       quantized_prefill_speedup=qr["prefill_speedup"] if dense else None)
            line += f"; {quantized} {qr['decode_tokens_per_second']:.1f} tokens/s"
        info(line)
        rows.append(row)
    return rows, notes


def bench_stage(state: "RunState") -> None:
    """measure_latency for a language model (bench_rows), then the latency target's result."""
    from compressor.app.pipeline import _latency_result
    from compressor.deploy.bench import environment

    recipe, report = state.recipe, state.report
    prompt, new = recipe.bench.lm_lengths
    if recipe.bench.backends:
        info(f"[6/6] measuring prefill ({prompt} tokens) and decode ({new} tokens) with the key/value cache, "
             + ("dense and compressed in turn" if state.dense_model is not None else "the given model alone"))
    else:
        info("[6/6] latency: skipped (bench.backends is empty)")
    with state.timer("bench"):
        report["latency"], notes = bench_rows(recipe, state.out, dense=state.dense_model is not None,
                                              macs=state.compressed.macs, dense_macs=state.dense and state.dense.macs)
    report["environment"] = environment(threads=recipe.bench.threads)
    for note in notes:
        state.notes.append(note)
        info(f"      note: {note}")
    if state.latency_target:
        report["target"]["latency"] = _latency_result(state.latency_target, report["latency"])


# ---------------------------------------------------------------------------------------------- compressor export
def export_language_model(model: Any, target: Path, recipe: Any, model_ref: str, *,
                          opset: Optional[int] = None) -> dict[str, Any]:
    """`compressor export` of a causal LM: `target` (model.onnx) with its key/value cache, its cached decode checked
    against PyTorch at two prompt lengths (on failure the file is removed and ParityError raised), and with
    export.quantize int8 / int4 the weight-only copy beside it, checked with its own tolerance (and scored on the
    recipe's validation set when a recipe is given)."""
    from compressor.deploy.export import remove_onnx
    from compressor.deploy.lm_export import export_causal_lm

    tokenizer = run_tokenizer(None, model_ref)
    with tempfile.TemporaryDirectory(prefix=".lm-export-", dir=target.parent) as tmp:
        exported = export_causal_lm(model.hf, Path(tmp), tokenizer=tokenizer, opset=opset)
        move_onnx(exported.fp32_path, target)
    result = _file_info(target, exported)
    verify = recipe.verify if recipe is not None else None
    atol = verify.atol if verify is not None else 1e-4
    rtol = max(verify.rtol if verify is not None else 0.0, PARITY_RTOL)
    try:
        result["parity"] = _parity(model, target, rtol=rtol, atol=atol, precision="fp32")
    except Exception:
        remove_onnx(target)  # an export that failed verification is not left looking complete
        raise
    q = recipe.export.quantize if recipe is not None else None
    if q is not None and q.enabled:
        from compressor.deploy.export import onnx_bytes
        from compressor.deploy.lm_export import quantize_weights

        path = target.with_name(f"{target.stem}.{q.mode}.onnx")
        quantize_weights(target, path, WEIGHT_ONLY_BITS[q.mode], block_size=QUANT_BLOCK)
        try:
            parity = _parity(model, path, rtol=WEIGHT_ONLY_RTOL[q.mode], atol=atol, precision=q.mode)
        except Exception:
            remove_onnx(path)
            raise
        quantized = {"mode": q.mode, "path": str(path), "bytes": onnx_bytes(path), "parity": parity,
                     "float_layers": [], "metric_key": "perplexity"}
        if recipe is not None:
            from compressor.train.data import build_datasets

            val_set = build_datasets(recipe.data, recipe.model, model_ref=model_ref, task=recipe.task)[1]
            quantized.update(evaluate_lm_onnx(path, val_set, recipe.build_task()))
        result["quantized"] = quantized
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What `compressor export` prints for a language model."""
    p = result["parity"]
    lines = [f"wrote {result['path']} ({result['bytes'] / 1024:.1f} KiB with its weights, {result['exporter']}, "
             f"key/value cache of {len(result['kv_shapes'])} layers); prefill + cached decode within {p['max_abs_diff']:.2e} of "
             f"PyTorch (allowed {p['allowed_abs_diff']:.2e}) on {p['samples']}"]
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    q = result.get("quantized")
    if q:
        scored = f", perplexity {q['perplexity']:.3f}" if "perplexity" in q else ""
        lines.append(f"wrote {q['path']} ({q['mode']} weight-only MatMulNBits, {q['bytes'] / 1024:.1f} KiB){scored}; "
                     f"logits within {q['parity']['relative_diff'] or 0:.2e} of max |logit| (allowed "
                     f"{q['parity']['rtol']:g})")
    return lines
