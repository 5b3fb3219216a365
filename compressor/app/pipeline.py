"""`compress`: checkpoint + recipe -> pruned, fine-tuned, slimmed, exported, verified and benchmarked model, with
report.json / report.md / plots in the run directory. The library entry point behind `compressor compress`."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from compressor.app import lm_deploy
from compressor.app.lm_deploy import check_lengths, is_language_model
from compressor.app.metric_change import arrow_text, gate_limit, gate_name, worsening
from compressor.app.recipe import Recipe, dump_recipe, load_recipe
from compressor.app.evaluation import evaluate_onnx
from compressor.app.nms_export import bench_pool, describe_inputs, nms_engine_stage, nms_stage
from compressor.deploy.export import export_onnx
from compressor.deploy.trt_compat import check_onnx
from compressor.deploy.verify import verify_onnx
from compressor.errors import BackendUnavailable, GateError, ParityError, UsageError
from compressor.models.loading import check_device, example_inputs, load_model
from compressor.models.slim import layer_widths, save_slim
from compressor.progress import info
from compressor.prune.methods import METHODS, PruningMethod
from compressor.prune.latency_target import STATE_FILE as LATENCY_TARGET_FILE
from compressor.prune.latency_target import latency_target_note, resolve_latency_target
from compressor.prune.round_to import STATE_FILE as ROUND_TO_FILE
from compressor.prune.round_to import resolve_round_to
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import MISS_TOLERANCE, relative_miss
from compressor.prune.decoder_snapshot import check_decoder_recipe
from compressor.prune.snapshot import check_embed
from compressor.train.data import build_datasets, sample_batch
from compressor.train.loop import check_method_schedule, dense_teacher, evaluate, fit
from compressor.train.text import TOKENIZER_DIR
from compressor import rundir
from compressor.ranks import compute_device, init_process_group, main_then_share


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()


# what a run writes beside recipe.yaml, as globs: the report (report.json last: the mark of a finished run), the
# checkpoint, round_to / latency-target choices, the slim model, the ONNX files (with external data), the
# quantized copies, TensorRT engines with their logs and calibration caches, a text model's tokenizer/ and hf/, a
# model's own format (save_native: Ultralytics' checkpoint of a YOLO model)
NATIVE_FILES = "ultralytics.pt"
REPORT_FILES = ("report.json", "report.md", "plot_*.png")
RUN_ARTIFACTS = (*REPORT_FILES, Path(rundir.CHECKPOINT).parts[0], ROUND_TO_FILE, LATENCY_TARGET_FILE, "model.pt",
                 "slim.json", "weights.safetensors", "model.onnx", "dense*.onnx", "model.*.onnx", "*.onnx.data",
                 "model*.engine", "model*.build.log", "model*.layers.json", "model*.calib-*.cache", TOKENIZER_DIR, "hf",
                 NATIVE_FILES)


def remove_artifacts(out: Path, patterns: tuple[str, ...]) -> None:
    """Delete what matches `patterns` in `out` (files, or folders with their contents); nothing else."""
    for pattern in patterns:
        for path in out.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def prepare_run_dir(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; refuse to mix runs (a different recipe, or an old run without --resume) and to
    write into a folder that holds something other than a run. --overwrite removes everything a run writes
    (RUN_ARTIFACTS), --resume the old report, so that a run that stops early never leaves a finished-looking one."""
    recipe_file = out / "recipe.yaml"
    rundir.check_output_dir(out, "--out")
    # a run that stopped before its first artifact (bad checkpoint or data) left only recipe.yaml: not a run to keep
    if out.exists() and any(p.name != recipe_file.name for p in out.iterdir()):
        if not recipe_file.is_file() and not (out / "report.json").is_file():
            raise UsageError(f"--out {out} holds files but no compressor run (no recipe.yaml or report.json), so "
                             "compress neither writes into it nor removes anything from it.",
                             hint=f"Choose a new or empty folder for the run, e.g. --out {out / recipe.name}.")
        if resume:
            if recipe_file.is_file() and recipe_file.read_text() != dump_recipe(recipe):
                raise UsageError(f"--resume: {recipe_file} differs from the recipe given now; resume with the same "
                                 "recipe and --set values, or start a new --out.")
            remove_artifacts(out, REPORT_FILES)
        elif overwrite:
            remove_artifacts(out, RUN_ARTIFACTS)
        else:
            raise UsageError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                             "or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_text(recipe_file, dump_recipe(recipe))
    return out


def preflight(recipe: Recipe, device: str) -> list[str]:
    """Fail before any training when an explicitly requested backend or device is missing (exit 3)."""
    notes = []
    check_device(device)  # the form, and the GPU asked for (exit 3 when missing)
    compute_device(device)  # under torchrun a fixed cuda:N is refused here, before any work
    from compressor.deploy.runners import check_backend

    for backend in recipe.bench.backends:
        check_backend(backend)
    trt = recipe.export.tensorrt.enabled
    if trt is not False and recipe.task != "language-modeling":  # a language model gets no engine (lm_deploy)
        from compressor.deploy.tensorrt_engine import tensorrt_available

        ok, why = tensorrt_available()
        if not ok and trt is True:
            raise BackendUnavailable(f"export.tensorrt.enabled is true but {why}.",
                                     hint="Set export.tensorrt.enabled: auto (or false), or run on an NVIDIA GPU "
                                          "machine with the [gpu] extra installed.")
        if not ok:
            notes.append(f"TensorRT engine skipped: {why} (export.tensorrt.enabled: auto)")
    return notes


@dataclass
class Measured:
    """Accuracy and size of one model (dense or compressed) as the report states them."""

    metrics: dict[str, float]
    macs: float
    params: int
    widths: dict[str, int]


@dataclass
class RunState:
    """Everything one compress run knows, filled in stage by stage (see STAGES)."""

    checkpoint: str
    recipe: Recipe
    out: Path
    device: str
    resume: bool
    trust_checkpoint: bool
    timer: Timer = field(default_factory=Timer)
    notes: list[str] = field(default_factory=list)
    model: Optional[nn.Module] = None
    train_set: Any = None
    val_set: Any = None
    round_note: Optional[str] = None
    latency_target: Optional[dict[str, Any]] = None  # the measure-prune loop of a latency target
    dense_model: Optional[nn.Module] = None  # a copy of the dense model, for export and the interleaved bench
    dense: Optional[Measured] = None
    method: Optional[PruningMethod] = None
    training: Any = None
    compressed: Optional[Measured] = None
    samples: Any = None
    hf_pretrained: Optional[dict[str, Any]] = None  # a Hugging Face model's save_pretrained folder, or why not
    lm_tokenizer: Any = None  # a causal LM's tokenizer (app/lm_deploy.py: tokenizer/, hf/ and the model builder)
    report: dict[str, Any] = field(default_factory=dict)
    # the Python API's in-memory inputs (app/in_memory.py): a model and datasets given here are not loaded
    loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None  # None: cross-entropy
    metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None
    data_label: Optional[str] = None  # how the report names in-memory datasets (None: the recipe's data.kind)
    task: Any = None  # the recipe's task (compressor/tasks): loss, metrics, parity rule

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = self.recipe.build_task()

    @property
    def example(self) -> torch.Tensor:
        return example_inputs(self.recipe.model)

    @property
    def eval_batch(self) -> int:
        return self.recipe.data.eval_batch_size or max(self.recipe.data.batch_size, 256)

    @property
    def method_class(self) -> type[PruningMethod]:
        return METHODS.get(self.recipe.prune.method)


def load_inputs(state: RunState) -> None:
    """The model and the datasets (unless the Python API gave them); then round_to: auto measured on this machine
    (round_to.json in the run)."""
    with state.timer("load"):
        if state.model is None:
            state.model = load_model(state.checkpoint, state.recipe.model, trust_checkpoint=state.trust_checkpoint)
        if state.recipe.prune.attention.embed:  # before any training: layers that cannot take it name themselves
            check_embed(state.model)
        # prune.decoder against the model (a decoder LM, allowed key/value group counts and hidden sizes) before the
        # dense evaluation, not at the first training step
        check_decoder_recipe(state.model, state.recipe.prune)
        if state.train_set is None:
            state.train_set, state.val_set = build_datasets(state.recipe.data, state.recipe.model,
                                                          model_ref=state.checkpoint, task=state.recipe.task)
        _label_unlabelled_text(state)
    if is_language_model(state):  # the bench's prompt + generated tokens fit the model's positions
        check_lengths(state.recipe, state.model)
    with state.timer("round_to"):  # recipe.yaml in the run keeps `auto` as written; the choice is in round_to.json
        state.recipe, state.round_note = resolve_round_to(state.recipe, state.model, out=state.out)
    if state.round_note:
        state.notes.append(state.round_note)
        info(state.round_note)
    with state.timer("latency_target"):  # after round_to: the loop plans with the resolved multiple
        state.recipe, state.latency_target = resolve_latency_target(state.recipe, state.model, out=state.out)
    if state.latency_target:
        note = latency_target_note(state.latency_target)
        state.notes.append(note)
        info(note)


def _label_unlabelled_text(state: RunState) -> None:
    """Unlabelled text (data.text.label_column: null): the dense model's predictions become the labels, so the
    validation top-1 is agreement with the dense model (train/text.py)."""
    from compressor.train.text import pseudo_label

    if pseudo_label(state.train_set, state.model) | pseudo_label(state.val_set, state.model):
        note = ("unlabelled text: the dense model's predictions are the labels, so top-1 is agreement with the "
                "dense model" + ("" if state.recipe.finetune.distill.enabled else
                                 "; finetune.distill is off, so training fits the dense model's hard labels only"))
        state.notes.append(note)
        info(note)


def measure_dense(state: RunState) -> None:
    info(f"[1/6] dense baseline: evaluating {state.checkpoint} on {len(state.val_set)} {state.recipe.data.kind} "
         "samples")
    with state.timer("dense_eval"):
        state.dense = _measure(state, state.model, device=state.device)
        state.dense_model = _copy_for_bench(state.model)
    d = state.dense
    info(f"      {_primary(state, d.metrics)}, {d.macs / 1e6:.1f} M MACs, {d.params / 1e3:.1f} K params")


def prune_and_finetune(state: RunState) -> None:
    recipe = state.recipe
    info(f"[2/6] pruning with {recipe.prune.method} (host {recipe.prune.host}) and fine-tuning "
         f"{recipe.finetune.epochs} epochs")
    state.method = state.method_class(recipe.prune_spec())
    teacher = dense_teacher(state.model) if recipe.finetune.distill.enabled else None
    # schedule warnings (printed, noted in the report), or a RecipeError when gates.strict_schedule
    state.notes += check_method_schedule(state.method, len(state.train_set), recipe.finetune, recipe.data)
    with state.timer("prune_finetune"):
        state.training = fit(state.model, state.train_set, state.val_set, recipe.finetune, recipe.data,
                             method=state.method, teacher=teacher, checkpoint=state.out / rundir.CHECKPOINT,
                             resume=state.resume, device=state.device, loss=state.loss, metric=state.metric,
                             task=state.task)
    state.model = state.model.cpu().eval().to(memory_format=torch.contiguous_format)


def measure_compressed(state: RunState) -> None:
    info("[3/6] evaluating the compressed model")
    with state.timer("eval"):
        state.compressed = _measure(state, state.model, device=state.device)
    c, d, key = state.compressed, state.dense, state.task.primary
    info(f"      {arrow_text(state.task, d.metrics[key], c.metrics[key])}, "
         f"MACs {c.macs / d.macs:.3f} of dense, params {c.params / d.params:.3f}")


def save_and_export(state: RunState) -> None:
    """The slim model, model.onnx and dense.onnx; then the report's body (method, target, training, exports).
    Under `deploy()` without a dense model there is no dense.onnx and the report's "dense" is None; without a
    method or training (deploy) their sections are empty."""
    info("[4/6] saving the slim model and exporting to ONNX")
    recipe, out, example = state.recipe, state.out, state.example
    zipped = state.method_class.keeps_dense_shapes(recipe.prune)  # zeros in dense tensors: the zipped size matters
    with state.timer("export"):
        artifacts = save_slim(state.model, out, _with_reference(recipe.model, state.checkpoint))
        artifacts.update(_save_text_artifacts(state))
        artifacts.update(_save_native(state))
        if is_language_model(state):  # with the key/value cache, both files by the same exporter
            onnx_info, dense_onnx = lm_deploy.export_stage(state)
        else:
            onnx_info = export_onnx(state.model, example, out / "model.onnx", recipe.export.onnx, zipped=zipped)
            dense_onnx = None if state.dense_model is None else export_onnx(
                state.dense_model, example, out / "dense.onnx", recipe.export.onnx, zipped=zipped)
        fusion = _transformer_fusions(state)
    if onnx_info.get("fallback"):
        state.notes.append(f"model.onnx{' and dense.onnx' if dense_onnx else ''}: {onnx_info['fallback']}")
        info(f"      note: {state.notes[-1]}")
    if "model_pt" not in artifacts:
        state.notes.append(f"no model.pt: {type(state.model).__qualname__} does not pickle (a class defined inside a "
                           "function); weights.safetensors and slim.json reload it into a fresh instance with "
                           "compressor.models.slim.load_slim(run_dir, model=...)")
        info(f"      note: {state.notes[-1]}")
    if state.samples is None:  # deploy() without a validation set drew seeded random inputs already
        state.samples, _ = sample_batch(state.val_set, recipe.verify.samples)
    d, c = state.dense, state.compressed
    state.report = {
        "status": "running", "recipe": json.loads(recipe.model_dump_json(by_alias=True)),
        "task": state.task.describe(),
        "checkpoint": str(state.checkpoint), "inputs": _inputs_summary(state), "run_dir": str(out),
        "notes": state.notes,
        "dense": None if d is None else {**d.metrics, "macs": d.macs, "params": d.params,
                                         "onnx_bytes": dense_onnx["bytes"],
                                         "onnx_zipped_bytes": dense_onnx["zipped_bytes"], "widths": d.widths},
        "compressed": {**c.metrics, "macs": c.macs, "params": c.params, "onnx_bytes": onnx_info["bytes"],
                       "onnx_zipped_bytes": onnx_info["zipped_bytes"], "widths": c.widths},
        "target": _target_summary(state, c.macs / d.macs if d is not None else None),
        "round_to": _round_to_summary(recipe, out, state.round_note),
        "method": state.method.summary() if state.method is not None else {},
        "training": None if state.training is None else {
            "history": state.training.history, "seconds": state.training.seconds,
            "resumed_from": state.training.resumed_from, "bn_recalibration": state.training.bn_recalibration},
        "exports": {"onnx": onnx_info, **({"dense_onnx": dense_onnx} if dense_onnx else {}),
                    **({"hf_pretrained": state.hf_pretrained} if state.hf_pretrained else {}),
                    **({"ort_fusion": fusion} if fusion else {})},
        "artifacts": {**artifacts, "onnx": str(out / "model.onnx")},
    }
    for event in state.report["method"].get("events", []):
        if event.get("note"):
            state.notes.append(f"pruning event {event.get('event', '?')}: {event['note']}")
    if state.report["target"]["met"] is False:
        state.notes.append(_target_missed(recipe, state.report["target"]))
        info(f"      note: {state.notes[-1]}")
    with state.timer("examples"):
        _write_examples(state)


def _write_examples(state: RunState) -> None:
    """Detection and segmentation: a few validation images with the dense and the compressed model's predictions,
    plot_examples.png and report["examples"] (app/examples.py); nothing for other tasks."""
    from compressor.app.examples import collect_examples, write_figure

    examples = collect_examples(state.task, state.val_set, state.model, state.dense_model)
    if examples is None:
        return
    measured = {"dense": state.dense, "compressed": state.compressed}
    captions = {name: _primary(state, m.metrics) for name, m in measured.items()
                if m is not None and state.task.primary in m.metrics}
    figure = write_figure(examples, state.out, metrics=captions)
    state.report["examples"] = examples.summary(figure.name)


def _inputs_summary(state: RunState) -> dict[str, Any]:
    """What the run worked on: the model (a checkpoint or reference, or the Python API's in-memory model), the data
    (the recipe's data.kind, or in-memory datasets), the training loss and the metric (the callables' names)."""
    from compressor.app.in_memory import callable_name

    loss = "cross-entropy" if state.loss is None else callable_name(state.loss)
    if state.recipe.finetune.distill.enabled and state.training is not None:
        loss += f", blended with distillation from the dense model (alpha {state.recipe.finetune.distill.alpha})"
    return {"model": str(state.checkpoint), "data": state.data_label or state.recipe.data.kind,
            "loss": loss if state.training is not None else None,
            "metric": None if state.metric is None else callable_name(state.metric)}


def _with_reference(model_cfg, checkpoint: str):
    """The model section slim.json records: a reference given as the checkpoint (`compress hf:DIR`,
    `compress torchvision:NAME`) is the architecture to rebuild from when the recipe names none."""
    from compressor.models.loading import is_reference

    if model_cfg.arch is None and is_reference(str(checkpoint)) and not Path(str(checkpoint)).is_file():
        return model_cfg.model_copy(update={"arch": str(checkpoint)})
    return model_cfg


def _transformer_fusions(state: RunState) -> Optional[dict[str, Any]]:
    """For a Hugging Face model: what ONNX Runtime's transformer optimizer fuses in dense.onnx and model.onnx. An
    optimizer failure is reported, not raised: the exports themselves are fine."""
    from compressor.models.hf import HFLogits, HFText

    if not isinstance(state.model, (HFText, HFLogits)) or state.dense_model is None:
        return None
    from compressor.deploy.ort_fusion import fusion_report

    try:
        return fusion_report(state.out / "dense.onnx", state.out / "model.onnx",
                             getattr(state.model.model.config, "model_type", None))
    except Exception as exc:  # the optimizer raises whatever its pattern code hits on an unusual graph
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}


def _save_native(state: RunState) -> dict[str, str]:
    """The compressed model in its framework's own format too, when it has one: a model's `save_native(folder,
    names, input_shape=..., data=...)` writes it into the run (a YOLODetector: ultralytics.pt, NATIVE_FILES) and
    returns {artifact: path}. Class names from the validation set where it names them."""
    save = getattr(state.model, "save_native", None)
    if not callable(save):
        return {}
    from compressor.app.examples import class_names

    data = state.recipe.data
    yaml = data.yolo if data.kind == "yolo" and data.yolo is not None and Path(data.yolo).is_file() else None
    names = class_names(state.val_set, int(getattr(state.model, "num_classes", state.task.num_classes)))
    return save(state.out, names, input_shape=tuple(state.recipe.model.input_shape), data=yaml)


def _save_text_artifacts(state: RunState) -> dict[str, Any]:
    """A text model's tokenizer (tokenizer/, what the ONNX needs beside it) and, for a Hugging Face model, the
    save_pretrained folder (hf/) where from_pretrained can rebuild the pruned shapes (models/hf_export.py)."""
    from compressor.models.hf import HFLogits, HFText
    from compressor.models.hf_causal_lm import HFCausalLM
    from compressor.train.text import root_dataset

    if isinstance(state.model, HFCausalLM):  # hf/ through the decoder's config (app/lm_deploy.py)
        return lm_deploy.save_lm_folders(state)
    if not isinstance(state.model, (HFText, HFLogits)):
        return {}
    from compressor.models.hf_export import save_pretrained_checked

    tokenizer = getattr(root_dataset(state.train_set), "tokenizer", None)
    saved = save_hf_folder(state, tokenizer, save_pretrained_checked)
    pretrained = state.hf_pretrained
    if not pretrained["written"]:
        state.notes.append(f"no save_pretrained folder: {pretrained['reason']}")
        info(f"      note: {state.notes[-1]}")
    return saved


def save_hf_folder(state: RunState, tokenizer: Any, save_checked) -> dict[str, Any]:
    """The run's tokenizer/ (when there is one) and its checked save_pretrained folder hf/ (`save_checked`: the
    model family's models/hf_export or hf_causal_lm function); sets state.hf_pretrained and returns the artifacts
    written ({tokenizer, hf_pretrained})."""
    saved: dict[str, Any] = {}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(state.out / TOKENIZER_DIR))
        saved["tokenizer"] = str(state.out / TOKENIZER_DIR)
    state.hf_pretrained = save_checked(state.model, state.out / "hf", state.example, tokenizer)
    if state.hf_pretrained["written"]:
        saved["hf_pretrained"] = state.hf_pretrained["path"]
    return saved

def verify_exports(state: RunState) -> None:
    """ONNX parity on real samples (ParityError after writing the report), then the TensorRT engine if any."""
    info("[5/6] verifying the export against PyTorch")
    if is_language_model(state):  # prefill and cached decode at two prompt lengths, then the ONNX perplexity
        return lm_deploy.verify_stage(state)
    report, out = state.report, state.out
    try:
        with state.timer("verify"):
            report["parity"] = {"onnx": verify_onnx(state.model, out / "model.onnx", state.samples,
                                                    state.recipe.verify, compare=state.task.compare,
                                                    rtol=state.task.rtol(state.recipe.verify.rtol))}
            if state.val_set is not None:  # deploy() without a validation set: parity on random inputs only
                onnx_eval = evaluate_onnx(out / "model.onnx", state.val_set, batch_size=state.eval_batch,
                                          metric=state.metric, task=state.task, model=state.model)
                for key, _, _ in state.task.columns:  # onnx_top1 (classification), onnx_map50_95, ...
                    if key in onnx_eval and key != "loss":
                        report["compressed"][f"onnx_{key}"] = onnx_eval[key]
                if "metric" in onnx_eval:
                    report["compressed"]["onnx_metric"] = onnx_eval["metric"]
        if "note" in report["parity"]["onnx"]:
            state.notes.append(report["parity"]["onnx"]["note"])
            info(f"      note: {state.notes[-1]}")
    except ParityError as exc:
        report["status"] = "failed: parity"
        report["parity"] = {"onnx": {"passed": False, "error": exc.render()}}
        _finish(report, out, state.timer)
        raise
    report["exports"]["tensorrt_compatibility"] = check_onnx(out / "model.onnx").to_dict()


def build_engine(state: RunState) -> None:
    """The TensorRT engine (where TensorRT and a GPU are): from the quantized ONNX when export.quantize made one
    (strongly typed), else from model.onnx with the recipe's precision flags."""
    report = state.report
    if is_language_model(state):
        report["exports"]["tensorrt"] = {"status": "skipped", "reason": "language models are deployed with their "
                                         "key/value cache on ONNX Runtime; compressor builds no TensorRT engine for "
                                         "them"}
        return
    report["exports"]["tensorrt"] = _tensorrt_step(state.recipe, state.out, state.model, state.samples,
                                                   state.train_set)
    if report["exports"]["tensorrt"].get("parity"):
        report["parity"]["tensorrt"] = report["exports"]["tensorrt"]["parity"]


def quantize_export(state: RunState) -> None:
    """export.quantize: model.int8.onnx or model.fp16.onnx beside model.onnx, checked against PyTorch with the
    precision's tolerance and evaluated on the whole validation set; int8 with quantization-aware fine-tuning
    when post-training int8 misses the accuracy gate (app/quantization.py)."""
    cfg = state.recipe.export.quantize
    if not cfg.enabled:
        return
    if is_language_model(state):  # weight-only MatMulNBits, no calibration or QAT
        return lm_deploy.quantize_stage(state)
    from compressor.app.quantization import needs_qat, quantize_after_qat, quantize_model
    from compressor.deploy.verify import torch_outputs_all

    info(f"      quantizing model.onnx to {cfg.mode}")
    report, out = state.report, state.out
    calibration = sample_batch(state.train_set, cfg.calibration.samples)[0].numpy() if cfg.mode == "int8" else None

    key = state.task.primary  # top1, map50_95, miou

    def evaluate(path: Path) -> float:
        return evaluate_onnx(path, state.val_set, batch_size=state.eval_batch, task=state.task,
                             model=state.model)[key]

    # the accuracy the quantized file is held to: the dense model's, or under deploy() without one the slim model's
    baseline = (state.dense or state.compressed).metrics[key]

    try:
        with state.timer("quantize"):
            report["quantized"] = quantize_model(
                out / "model.onnx", state.recipe, calibration=calibration,
                reference=torch_outputs_all(state.model, state.samples), samples=state.samples.numpy(),
                evaluate=evaluate, baseline_top1=baseline, key=key, compare=state.task.reduced_compare)
        if needs_qat(state.recipe, report["quantized"], baseline, key):
            with state.timer("qat"):
                report["quantized"] = quantize_after_qat(
                    state.model, out / "model.int8.onnx", state.recipe, train_set=state.train_set,
                    val_set=state.val_set, samples=state.samples, ptq=report["quantized"], evaluate=evaluate,
                    device=state.device, task=state.task, key=key)
    except ParityError as exc:
        report["status"] = "failed: parity"
        report["parity"][cfg.mode] = {"passed": False, "error": exc.render()}
        _finish(report, out, state.timer)
        raise
    q = report["quantized"]
    report["parity"][cfg.mode] = q["parity"]
    report["artifacts"][cfg.mode] = q["path"]
    agreement = q["parity"].get("top1_agreement")
    info(f"      {cfg.mode} ONNX: {_primary(state, q)} (fp32 {report['compressed'][f'onnx_{key}']:.2f}), "
         + (f"top-1 agreement {agreement:.4f}, " if agreement is not None else
            f"max diff / max |output| {q['parity'].get('relative_diff') or 0.0:.2e}, ")
         + f"{len(q.get('float_layers', []))} layers in float"
         + (f", after {q['qat']['epochs']} QAT epoch(s) (post-training {q['qat'][f'post_training_{key}']:.2f})"
            if q.get("qat") else ""))


def measure_latency(state: RunState) -> None:
    recipe, report = state.recipe, state.report
    if is_language_model(state):  # prefill ms and decode tokens/s of the ONNX files with their caches
        return lm_deploy.bench_stage(state)
    if recipe.bench.backends:
        info(f"[6/6] measuring latency ({', '.join(recipe.bench.backends)}; batch {recipe.bench.batch_sizes}), "
             + ("dense and compressed interleaved" if state.dense_model is not None else "the given model alone"))
    else:
        info("[6/6] latency: skipped (bench.backends is empty)")
    with state.timer("bench"):
        report["latency"], report["environment"] = _bench(recipe, state.out, state.dense_model, state.model,
                                                          state.compressed.macs, state.dense and state.dense.macs,
                                                          inputs=bench_pool(state))
        if state.latency_target:
            report["target"]["latency"] = _latency_result(state.latency_target, report["latency"])
        if "ort-cpu" in recipe.bench.backends and state.dense_model is not None:  # it compares with dense.onnx
            report["ort_cpu_layout"] = _layout_check(recipe, state.out)
            for finding in report["ort_cpu_layout"]["findings"]:
                info(f"      note: {finding}")


def check_gates(state: RunState) -> None:
    """Write the report; GateError (exit 1) afterwards when a gate failed."""
    report = state.report
    report["gates"] = evaluate_gates(state.recipe, report)
    failed = [g for g in report["gates"] if not g["passed"]]
    report["status"] = "failed: gates" if failed else "ok"
    _finish(report, state.out, state.timer)
    if failed:
        raise GateError("; ".join(f"{g['name']} {g['value']:.3f} vs limit {g['limit']}" for g in failed) +
                        f". The report is in {state.out}/report.md.")


# every rank runs the stages up to measure_compressed (DDP training); the main process alone runs the rest
TRAINING_STAGES = (load_inputs, measure_dense, prune_and_finetune, measure_compressed)
MAIN_STAGES = (save_and_export, verify_exports, nms_stage, quantize_export, build_engine, nms_engine_stage,
               measure_latency, check_gates)


def compress(checkpoint: Optional[str | Path] = None, recipe: Recipe | dict | str | Path | None = None,
             out_dir: Optional[str | Path] = None, *, model: Optional[nn.Module] = None, train_set: Any = None,
             val_set: Any = None, loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
             metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
             example_inputs: Optional[torch.Tensor] = None, ignore: Optional[list[str]] = None, device: str = "cpu",
             resume: bool = False, overwrite: bool = False, trust_checkpoint: bool = False,
             overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the whole chain (TRAINING_STAGES, then MAIN_STAGES) and return the report (also written to
    out_dir/report.json, beside report.md, the slim model and the ONNX files: the CLI's run directory).

    The model is a checkpoint or reference (`checkpoint`, loaded with the recipe's model section), or an in-memory
    `model` (pruned and trained in place: afterwards it is the compressed model, on the CPU in eval mode). With
    `model=`, the recipe's model section is replaced by what `example_inputs` (one batch; or the recipe's
    model.input_shape) and the model's output say (app/in_memory.model_section); `ignore` (layer names or `re:`
    patterns never pruned) defaults to the recipe's model.ignore. `train_set` / `val_set` (map-style datasets of
    (input, class index) pairs) replace the recipe's data section; its batch sizes, workers and subsets still apply.
    `loss(outputs, targets) -> scalar tensor` replaces cross-entropy in training (finetune.distill still blends in).
    `metric(outputs, targets) -> float` (a batch mean, higher is better) is averaged over the validation set
    weighted by batch size and reported beside top-1 (report "metric", history "val_metric"); gates.max_metric_drop
    holds it (gates.max_accuracy_drop stays on top-1). `recipe`: a file, a shipped recipe's name, a Recipe or a dict;
    `overrides`: `--set`-style assignments.

    Raises UsageError (exit 2) for a missing or contradicting argument (no model, both a checkpoint and a model, no
    example inputs, one dataset of two, a loss that is not callable, ...), ModelLoadError / DataError (exit 2) for a
    model or dataset compressor cannot work with, GateError (exit 1) after writing the report when a recipe gate
    fails, ParityError (exit 1) when an export disagrees with PyTorch.
    """
    from compressor.app.in_memory import check_arguments, check_datasets, data_label, model_label, model_section
    from compressor.app.recipe import as_recipe
    from compressor.train.data import keep_subsets

    recipe = as_recipe(recipe, overrides)
    check_arguments(checkpoint, model, example_inputs=example_inputs, ignore=ignore, loss=loss, metric=metric,
                    gates=recipe.gates)
    labels: dict[str, Any] = {}
    if model is not None:  # checked and measured on the CPU, as a loaded model is; fit moves it to `device`
        model = model.cpu() if isinstance(model, nn.Module) else model
        recipe = recipe.model_copy(update={"model": model_section(model, example_inputs, recipe.model, ignore=ignore)})
    if train_set is not None or val_set is not None:
        check_datasets(train_set, val_set, recipe.model)
        labels["data_label"] = data_label(train_set, val_set)
        train_set, val_set = keep_subsets(train_set, val_set, recipe.data)
    out = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    notes = preflight(recipe, device)
    # under torchrun the group starts here, before anything measures or writes: rank 0 prepares the run directory
    # (and later measures round_to: auto and a latency target), the other ranks wait and adopt
    init_process_group(device)
    out = main_then_share(lambda: prepare_run_dir(out, recipe, resume=resume, overwrite=overwrite))
    state = RunState(checkpoint=model_label(model) if model is not None else str(checkpoint), recipe=recipe, out=out,
                     device=device, resume=resume, trust_checkpoint=trust_checkpoint, notes=notes, model=model,
                     train_set=train_set, val_set=val_set, loss=loss, metric=metric, **labels)
    with caller_rng_kept(device):  # fit seeds torch's generator (finetune.seed); the caller's stream is restored
        for stage in TRAINING_STAGES:
            stage(state)
        if not rundir_is_main():
            return {}
        for stage in MAIN_STAGES:
            stage(state)
    return state.report


def caller_rng_kept(device: str):
    """A context that restores torch's random state (the CPU's, and the CUDA device's when `device` is one) on exit:
    compress and deploy seed the generator for repeatable training and leave the caller's stream as it was."""
    dev = compute_device(device)
    return torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [])


def _measure(state: RunState, model: nn.Module, device: str = "cpu") -> Measured:
    """Accuracy on the validation set (none under deploy() without one), MACs, parameters and layer widths."""
    metrics = {} if state.val_set is None else evaluate(model, state.val_set, batch_size=state.eval_batch,
                                                        device=device, metric=state.metric, task=state.task)
    macs, params = snapshot_macs(model.cpu(), state.example)
    return Measured(metrics=metrics, macs=macs, params=params, widths=layer_widths(model))


def _layout_check(recipe: Recipe, out: Path) -> dict[str, Any]:
    """How many convolutions ORT-CPU runs in its blocked layout, dense vs compressed, with advice on round_to."""
    from compressor.deploy.ort_profile import ROUND_TO_ADVICE, layout_check

    advice = ROUND_TO_ADVICE if not recipe.prune.round_to else (
        f"this run kept multiples of {recipe.prune.round_to} (prune.round_to"
        f"{' auto' if recipe.prune._round_to_auto else ''}; narrower layers smaller ones under auto): compare "
        "other multiples with --set prune.round_to=N and `compressor profile`")
    return layout_check(out / "dense.onnx", out / "model.onnx", threads=recipe.bench.threads,
                        input_shape=list(recipe.model.input_shape), advice=advice)


def _primary(state: RunState, metrics: dict[str, float]) -> str:
    """The task's primary metric of a measurement, as the log shows it (top-1 93.41%, mAP50-95 41.20, ...)."""
    task = state.task
    return f"{task.primary_label} {metrics[task.primary]:.2f}{task.primary_unit}"


def rundir_is_main() -> bool:
    from compressor.progress import is_main_process

    return is_main_process()


def _copy_for_bench(model):
    import copy

    return copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)


def _target_summary(state: RunState, achieved: Optional[float]) -> dict[str, Any]:
    """The MAC target asked and achieved; none asked under deploy() (it pruned nothing: state.method is None), and
    no ratio achieved without a dense model."""
    recipe = state.recipe
    target = recipe.prune.target
    if state.method is None or state.method_class.keeps_dense_shapes(recipe.prune):
        return {"asked": None, "asked_macs_ratio": None, "achieved_macs_ratio": achieved,
                "achieved_mac_speedup": 1 / achieved if achieved else None, "met": None}
    asked = None if recipe.prune._latency_cost is not None else target.remaining_macs()  # a latency budget
    written = recipe.prune._latency_target or target  # a latency target as the recipe says it, not its MAC plan
    return {"asked": written.model_dump(exclude_none=True), "asked_macs_ratio": asked, "achieved_macs_ratio": achieved,
            "achieved_mac_speedup": 1 / achieved if achieved else None, "tolerance": MISS_TOLERANCE,
            "met": None if asked is None or achieved is None else abs(relative_miss(achieved, asked)) <= MISS_TOLERANCE}


def _latency_result(loop: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency target: the loop before fine-tuning, and the speedup the final bench measured."""
    from compressor.prune.latency_target import TOLERANCE

    row = next((r for r in rows if r["backend"] == loop["backend"] and r["batch_size"] == loop["batch"]), None)
    final = row["speedup"] if row else None
    return {**loop, "final_speedup": final,
            "final_met": None if final is None else abs(final / loop["asked_speedup"] - 1) <= TOLERANCE}


def _round_to_summary(recipe: Recipe, out: Path, note: Optional[str]) -> dict[str, Any]:
    """The channel multiple used and, for `auto`, how it was chosen (round_to.json holds the measured rows)."""
    from compressor.prune.round_to import STATE_FILE

    saved = out / STATE_FILE
    chosen = json.loads(saved.read_text()) if saved.is_file() else {}
    return {"value": recipe.prune.round_to, "auto": recipe.prune._round_to_auto, "note": note, **chosen}


def _target_missed(recipe: Recipe, target: dict[str, Any]) -> str:
    achieved, asked = target["achieved_macs_ratio"], target["asked_macs_ratio"]
    head = (f"MAC target missed by more than {MISS_TOLERANCE:.0%}: {achieved:.3f} of the dense MACs kept, "
            f"{asked:.3f} asked ({relative_miss(achieved, asked):+.1%}).")
    if achieved > asked:
        return (f"{head} The prunable groups cannot give more under prune.max_layer_ratio "
                f"{recipe.prune.max_layer_ratio} and prune.round_to {recipe.prune.round_to} (ignored layers, attention "
                "widths and unprunable layers stay as they are; `compressor inspect` lists them).")
    return (f"{head} More was removed than asked: prune.round_to {recipe.prune.round_to} leaves coarse steps for "
            "the few prunable groups, or torch-pruning removed coupled channels the plan did not count (the pruning "
            "events' notes say which).")


def _tensorrt_step(recipe: Recipe, out: Path, model, samples, train_set) -> dict[str, Any]:
    if recipe.export.tensorrt.enabled is False:
        return {"status": "disabled"}
    from compressor.deploy.tensorrt_engine import build_and_verify, settings_from_recipe, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        return {"status": "skipped", "reason": why}
    quantized = recipe.export.quantize.mode if recipe.export.quantize.enabled else None
    settings = settings_from_recipe(recipe, quantized=quantized)
    calibration = sample_batch(train_set, settings.calib_samples)[0] if settings.calib_samples else None
    onnx_path = out / (f"model.{quantized}.onnx" if quantized else "model.onnx")
    return build_and_verify(model, onnx_path, samples, recipe, settings, calibration=calibration)


def _bench(recipe: Recipe, out: Path, dense, model, macs: float, dense_macs: Optional[float], *,
           inputs: Optional[torch.Tensor] = None):
    """Dense and compressed (and the quantized ONNX, and with export.nms the .nms.onnx files, on ONNX Runtime
    backends) timed round robin per backend and batch size, so that machine noise hits all alike. `dense` None
    (deploy() without a dense model): the compressed model (and its quantized / NMS file) alone, rows without dense
    timings or speedups. `inputs`: the samples batches are drawn from (a detector's validation images) instead of
    seeded random inputs; every row says which (row["inputs"])."""
    from compressor.deploy.bench import environment
    from compressor.deploy.timing import Budget, Timed, time_models

    cfg = recipe.bench
    quant = recipe.export.quantize.mode if recipe.export.quantize.enabled else None
    nms = recipe.export.nms.enabled and (out / "model.nms.onnx").is_file()
    used = describe_inputs(inputs)
    rows = []

    first = 0 if dense is None else 1  # the compressed model's place: deploy() without a dense model times it alone

    def row(backend: str, timed: Timed) -> None:
        stats = timed.stats
        rows.append({"backend": backend, "batch_size": timed.batch, "dense": None, "compressed": asdict(stats[first]),
                     "speedup": None, "realised_ratio": None, "dense_ms": None, "compressed_ms": timed.ms(first),
                     "inputs": used})
        line = f"      {backend} batch {timed.batch}: {stats[first].p50:.3f} ms"
        if dense is not None:
            speedup = timed.speedup(1)
            rows[-1].update(dense=asdict(stats[0]), speedup=speedup, realised_ratio=speedup / (dense_macs / macs),
                            dense_ms=timed.ms(0))
            line = f"      {backend} batch {timed.batch}: {stats[0].p50:.3f} -> {stats[1].p50:.3f} ms (x{speedup:.2f})"
        q = first + 1  # the quantized file's place, then the NMS files' (dense first)
        if quant and backend != "torch":
            rows[-1].update(quantized=asdict(stats[q]), quantized_mode=quant, quantized_ms=timed.ms(q),
                            quantized_speedup=timed.speedup(q) if dense is not None else None)
            line += f", {quant} {stats[q].p50:.3f} ms" + (f" (x{rows[-1]['quantized_speedup']:.2f})"
                                                          if dense is not None else "")
            q += 1
        if nms and backend != "torch":  # the whole deployed detector: raw model + NMS in the graph
            c = q + first
            timed_nms = {"dense": None if dense is None else asdict(stats[q]), "compressed": asdict(stats[c]),
                         "dense_ms": None if dense is None else timed.ms(q), "compressed_ms": timed.ms(c),
                         "speedup": None if dense is None else timed.speedup(c, q)}
            rows[-1]["nms"] = timed_nms
            line += (f"; with NMS {stats[c].p50:.3f} ms" if dense is None else
                     f"; with NMS {stats[q].p50:.3f} -> {stats[c].p50:.3f} ms (x{timed_nms['speedup']:.2f})")
        info(line)

    for backend in cfg.backends:
        artifacts = [dense, model] if backend == "torch" else [out / "dense.onnx", out / "model.onnx"]
        artifacts = artifacts[1 - first:]
        if quant and backend != "torch":
            artifacts.append(out / f"model.{quant}.onnx")
        if nms and backend != "torch":
            artifacts += [out / "dense.nms.onnx", out / "model.nms.onnx"][1 - first:]
        time_models(backend, artifacts, cfg.batch_sizes, Budget(cfg.warmup_ms, cfg.min_runs, cfg.min_seconds),
                    each=lambda timed: row(backend, timed), threads=cfg.threads,
                    input_shape=list(recipe.model.input_shape), interleaved=True, inputs=inputs)
    return rows, environment(threads=cfg.threads)


def evaluate_gates(recipe: Recipe, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's gates on the report: the primary metric's worsening from the dense model (points lost by a
    higher-is-better metric under max_accuracy_drop, the relative increase of a lower-is-better one under
    max_metric_increase; the quantized file's too), the Python API's metric, and the first bench row's speedup."""
    gates = []
    g = recipe.gates
    task = report.get("task") or {"primary": "top1", "higher_is_better": True}
    key, name = task["primary"], gate_name(task)
    limit = gate_limit(task, g)
    if limit is not None:
        worse = worsening(task, report["dense"][key], report["compressed"][key])
        gates.append({"name": name, "value": worse, "limit": limit, "passed": worse <= limit})
    if g.max_metric_drop is not None:  # compress() refuses the gate without a metric
        drop = report["dense"]["metric"] - report["compressed"]["metric"]
        gates.append({"name": "max_metric_drop", "value": drop, "limit": g.max_metric_drop,
                      "passed": drop <= g.max_metric_drop})
    quantized = report.get("quantized")
    if limit is not None and quantized and key in quantized:
        worse = worsening(task, report["dense"][key], quantized[key])
        gates.append({"name": f"{name} ({quantized['mode']} ONNX)", "value": worse, "limit": limit,
                      "passed": worse <= limit})
    if g.min_speedup is not None and report.get("latency"):
        first = report["latency"][0]
        where = first.get("measure") or f"batch {first['batch_size']}"  # a language model's: decode tokens/s
        gates.append({"name": f"min_speedup ({first['backend']}, {where})",
                      "value": first["speedup"], "limit": g.min_speedup, "passed": first["speedup"] >= g.min_speedup})
    return gates


def _finish(report: dict[str, Any], out: Path, timer: Timer) -> None:
    from compressor.app.report import write_report

    report["timings_s"] = dict(timer.seconds)
    write_report(report, out)
