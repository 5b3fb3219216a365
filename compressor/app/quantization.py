"""export.quantize in `compress` and `compressor export`: calibrate on training samples, quantize model.onnx
(deploy/quantize.py), choose the layers kept in float (`exclude: auto`), check the quantized file against the
fp32 model with the tolerance of its precision, and evaluate it on the whole validation set."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from compressor.deploy.quantize import Int8Quantizer, convert_fp16, int8_settings, rank_sensitivity, resolve_exclude
from compressor.deploy.verify import check, compare_all
from compressor.errors import ParityError
from compressor.progress import info

if TYPE_CHECKING:
    from compressor.app.recipe import Recipe

SENSITIVITY_SAMPLES = 256


def quantized_path(fp32_path: Path, mode: str) -> Path:
    return Path(fp32_path).with_name(f"{Path(fp32_path).stem}.{mode}.onnx")


def onnx_runner() -> Callable[[Path, np.ndarray], np.ndarray]:
    """run(path, inputs) -> outputs with ONNX Runtime CPU, one session per file (kept while the runner lives)."""
    from compressor.deploy.onnx_runtime import create_session, run_onnx

    sessions: dict[str, Any] = {}

    def run(path: Path, inputs: np.ndarray) -> np.ndarray:
        key = f"{path}:{Path(path).stat().st_mtime_ns}"
        if key not in sessions:
            sessions.clear()
            sessions[key] = create_session(path, "ort-cpu")
        return run_onnx(sessions[key], inputs, batch_size=64, source=repr(Path(path).name))

    return run


def target_is_gpu(recipe: "Recipe") -> bool:
    """Whether the recipe deploys to a GPU (its first bench backend runs on one): symmetric int8 then."""
    from compressor.deploy.runners import gpu_backends

    return bool(recipe.bench.backends) and recipe.bench.backends[0] in gpu_backends()


def verify_quantized(reference: np.ndarray | list[np.ndarray], path: Path, samples: np.ndarray, recipe: "Recipe",
                     precision: str, compare: Optional[Callable] = None) -> dict[str, Any]:
    """The quantized file vs the fp32 PyTorch outputs (`reference`: every output on `samples`, or the only one):
    `compare` is the task's reduced-precision rule (Task.reduced_compare; compare_all by default), judged with the
    precision's relative tolerance (verify.int8_rtol / fp16_rtol x max |output|) and top-1 agreement. ParityError
    (exit 1) beyond them."""
    from compressor.deploy.onnx_runtime import create_session, run_onnx_outputs

    references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    candidate = run_onnx_outputs(create_session(path, "ort-cpu"), samples, batch_size=64, source=repr(Path(path).name))
    cfg = recipe.verify
    rtol = {"int8": cfg.int8_rtol, "fp16": cfg.fp16_rtol}[precision]
    agreement = {"int8": cfg.int8_min_top1_agreement, "fp16": cfg.reduced_min_top1_agreement}[precision]
    return check((compare or compare_all)(references, candidate), cfg, f"{precision.upper()} ONNX {Path(path).name}",
                 precision=precision, atol=0.0, rtol=rtol, min_agreement=agreement)


def quantize_model(fp32_path: Path, recipe: "Recipe", *, calibration: np.ndarray,
                   reference: np.ndarray | list[np.ndarray], samples: np.ndarray, evaluate: Callable[[Path], float],
                   baseline_top1: Optional[float] = None, out: Optional[Path] = None,
                   exclude: Optional[list[str]] = None, key: str = "top1", compare: Optional[Callable] = None
                   ) -> dict[str, Any]:
    """Quantize `fp32_path` as export.quantize asks; returns the report section. `reference`: the fp32 PyTorch
    outputs on `samples` (every output; parity by `compare`, the task's reduced_compare); `evaluate(path)`: top-1 on the validation set; `baseline_top1`: the dense
    model's top-1, which gates.max_accuracy_drop is measured from (exclude: auto); `exclude`: ONNX node names kept
    in float instead of export.quantize.exclude (the QAT model keeps what post-training int8 chose). `key`: the
    name the evaluated metric is reported under (the task's primary metric: top1, map50_95, miou)."""
    cfg = recipe.export.quantize
    if exclude is not None:
        cfg = cfg.model_copy(update={"exclude": list(exclude)})
    out = out or quantized_path(fp32_path, cfg.mode)
    run = onnx_runner()
    if cfg.mode == "fp16":
        import onnx

        nodes = [n.name for n in onnx.load(str(fp32_path), load_external_data=False).graph.node]
        exclude = resolve_exclude(cfg.exclude, nodes) if isinstance(cfg.exclude, list) else []
        result = convert_fp16(fp32_path, out, exclude=exclude)
        settings_info: dict[str, Any] = {}
        tries: list[dict] = []
        sensitivity: list[dict] = []
    else:
        settings = int8_settings(cfg.activations, cfg.reduce_range, gpu=target_is_gpu(recipe))
        settings_info = {"activations": settings.activations, "reduce_range": settings.reduce_range,
                         "per_channel": cfg.per_channel, "calibration": cfg.calibration.method,
                         "calibration_samples": int(len(calibration)), "why": settings.reason}
        quantizer = Int8Quantizer(Path(fp32_path), calibration, cfg.calibration.method, cfg.per_channel, settings)
        try:
            result, tries, sensitivity = _int8(quantizer, cfg, recipe, out, run, samples, evaluate, baseline_top1,
                                               key)
        finally:
            quantizer.close()
    try:
        parity = verify_quantized(reference, out, samples, recipe, cfg.mode, compare)
    except ParityError:
        out.unlink(missing_ok=True)  # not left looking like a verified export
        raise
    value = tries[-1][key] if tries else evaluate(out)
    return {**result, "settings": settings_info, "parity": parity, key: value, "metric_key": key, "auto_tries": tries,
            "sensitivity": sensitivity[:10], "bytes": out.stat().st_size}


def _int8(quantizer: Int8Quantizer, cfg, recipe: "Recipe", out: Path, run, samples: np.ndarray,
          evaluate: Callable[[Path], float], baseline_top1: Optional[float], key: str = "top1"):
    if cfg.exclude != "auto":
        return quantizer.quantize(out, exclude=resolve_exclude(cfg.exclude, quantizer.nodes)), [], []
    limit = recipe.gates.max_accuracy_drop
    with tempfile.TemporaryDirectory(prefix="compressor-sens-") as work:
        info(f"      int8 sensitivity: {len(quantizer.nodes)} layers quantized one at a time")
        ranking = rank_sensitivity(quantizer, run, samples[:SENSITIVITY_SAMPLES], Path(work))
    tries, excluded, count = [], [], 0
    for step in range(cfg.max_auto_steps):
        result = quantizer.quantize(out, exclude=excluded)
        top1 = evaluate(out)
        drop = None if baseline_top1 is None else baseline_top1 - top1
        tries.append({"excluded": list(excluded), key: top1, "drop_pp": drop})
        info(f"      int8 with {len(excluded)} float layers: {key} {top1:.2f}" +
             (f" ({-drop:+.2f} pp from dense, gate {limit} pp)" if drop is not None else ""))
        if drop is None or limit is None or drop <= limit or count >= len(ranking):
            break
        count = max(1, 2 * count)  # 1, 2, 4, ... of the most harmful layers
        excluded = [r["node"] for r in ranking[:count]]
    return result, tries, ranking


def quantize_for_export(model, fp32_path: Path, recipe: "Recipe", samples, *, model_ref: Optional[str] = None
                        ) -> dict[str, Any]:
    """`compressor export` with export.quantize: calibration on the recipe's training data, evaluation on its
    validation set (the task's primary metric); `exclude: auto` measures its gate from this model's own metric
    (there is no dense model)."""
    from compressor.app.evaluation import evaluate_onnx
    from compressor.deploy.verify import torch_outputs_all
    from compressor.train.data import build_datasets, sample_batch
    from compressor.train.text import pseudo_label

    cfg = recipe.export.quantize
    train_set, val_set = build_datasets(recipe.data, recipe.model, model_ref=model_ref, task=recipe.task)
    pseudo_label(val_set, model)  # unlabelled text: the fp32 model's predictions, so top-1 is agreement with it
    batch = recipe.data.eval_batch_size or max(recipe.data.batch_size, 256)
    calibration = sample_batch(train_set, cfg.calibration.samples)[0].numpy() if cfg.mode == "int8" else None

    task = recipe.build_task()  # its primary metric (top-1, mAP50-95, mIoU) and its reduced-precision parity rule

    def evaluate(path: Path) -> float:
        return evaluate_onnx(path, val_set, batch_size=batch, task=task, model=model)[task.primary]

    baseline = evaluate(fp32_path) if cfg.exclude == "auto" else None
    return quantize_model(fp32_path, recipe, calibration=calibration, reference=torch_outputs_all(model, samples),
                          samples=samples.numpy(), evaluate=evaluate, baseline_top1=baseline, key=task.primary,
                          compare=task.reduced_compare)


def needs_qat(recipe: "Recipe", ptq: dict[str, Any], dense_top1: float, key: str = "top1") -> bool:
    """export.quantize.qat: true, or auto when post-training int8 misses gates.max_accuracy_drop."""
    cfg = recipe.export.quantize
    if cfg.mode != "int8" or cfg.qat.enabled is False:
        return False
    if cfg.qat.enabled is True:
        return True
    limit = recipe.gates.max_accuracy_drop
    return limit is not None and dense_top1 - ptq[key] > limit


def quantize_after_qat(model, out: Path, recipe: "Recipe", *, train_set, val_set, samples, ptq: dict[str, Any],
                       evaluate: Callable[[Path], float], device: str = "cpu", task: Any = None,
                       key: str = "top1") -> dict[str, Any]:
    """QAT on a copy of the pruned model (the layers post-training int8 kept in float stay float), then the same
    static quantization of its export into model.int8.onnx. The fp32 model.onnx and the slim model stay as they
    were; the report's `qat` says that the int8 file comes from the QAT weights."""
    import copy

    from compressor.deploy.export import export_onnx
    from compressor.deploy.quantize import module_name
    from compressor.deploy.verify import torch_outputs_all
    from compressor.models.loading import example_inputs
    from compressor.train import qat
    from compressor.train.data import sample_batch
    from compressor.train.loop import fit

    cfg = recipe.export.quantize
    settings = int8_settings(cfg.activations, cfg.reduce_range, gpu=target_is_gpu(recipe))
    float_nodes = list(ptq.get("float_layers") or [])
    student = copy.deepcopy(model).cpu()
    state = qat.attach(student, symmetric_inputs=settings.symmetric_activations, reduce_range=settings.reduce_range,
                       per_channel=cfg.per_channel, skip={module_name(n) for n in float_nodes})
    finetune = recipe.finetune.model_copy(update={
        "epochs": cfg.qat.epochs, "optimizer": recipe.finetune.optimizer.model_copy(update={"lr": cfg.qat.lr}),
        "scheduler": recipe.finetune.scheduler.model_copy(update={"kind": "constant", "warmup_epochs": 0.0})})
    info(f"      post-training int8 {key} {ptq[key]:.2f}: quantization-aware fine-tuning for "
         f"{cfg.qat.epochs} epoch(s) at lr {cfg.qat.lr:g}, {len(state.modules)} layers fake-quantized")
    history = fit(student, train_set, val_set, finetune, recipe.data, device=device, alone=True, task=task).history
    qat.detach(student, state)
    student = student.cpu().eval()
    with tempfile.TemporaryDirectory(prefix="compressor-qat-") as work:
        fp32 = Path(work) / "model.qat.onnx"
        export_onnx(student, example_inputs(recipe.model), fp32, recipe.export.onnx)
        calibration = sample_batch(train_set, cfg.calibration.samples)[0].numpy()
        result = quantize_model(fp32, recipe, calibration=calibration, reference=torch_outputs_all(student, samples),
                                samples=samples.numpy(), evaluate=evaluate, out=out, exclude=float_nodes, key=key,
                                compare=task.reduced_compare if task is not None else None)
    result["path"] = str(out)
    result["qat"] = {"epochs": cfg.qat.epochs, "lr": cfg.qat.lr, f"post_training_{key}": ptq[key],
                     "fake_quantized_layers": len(state.modules), "history": history}
    return result
