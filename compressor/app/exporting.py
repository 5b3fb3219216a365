"""`compressor export`: load a checkpoint or slim model, export it to ONNX, verify it on the recipe's validation
samples, quantize it as export.quantize asks, and build a TensorRT engine when asked."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.deploy.config import OnnxConfig
from compressor.deploy.export import export_onnx, remove_onnx


def _with_opset(cfg: OnnxConfig, opset: int) -> OnnxConfig:
    """`cfg` with --opset applied, validated like the recipe's export.onnx.opset (model_copy would not check it)."""
    from pydantic import ValidationError

    from compressor.errors import UsageError

    try:
        return OnnxConfig.model_validate({**cfg.model_dump(), "opset": opset})
    except ValidationError as exc:
        reason = "; ".join(e["msg"] for e in exc.errors())
        raise UsageError(f"--opset {opset}: {reason} (the range export.onnx.opset allows).") from exc


def export_model(model_ref: str, recipe, *, fmt: str = "onnx", out: Path | None = None, opset: int | None = None,
                 trust_checkpoint: bool = False, trt_options: dict | None = None) -> dict[str, Any]:
    """`compressor export`: load a checkpoint or slim model, export it and verify the export.

    Parity uses the recipe's validation samples when a recipe is given, else seeded random inputs (said so).
    """
    from compressor.errors import UsageError
    from compressor.models.loading import example_inputs, load_model
    from compressor.deploy.config import OnnxConfig, VerifyConfig
    from compressor.models.config import ModelConfig
    from compressor.models.slim import read_model_config
    from compressor.deploy.verify import verify_onnx
    from compressor.tasks import task_of_model

    if fmt not in ("onnx", "tensorrt"):
        raise UsageError(f"--format {fmt!r}: use onnx or tensorrt.")
    if fmt == "tensorrt":
        from compressor.deploy.tensorrt_engine import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            from compressor.errors import BackendUnavailable

            raise BackendUnavailable(f"--format tensorrt needs TensorRT and an NVIDIA GPU, but {why}.",
                                     hint="Export to ONNX here and build the engine on the target device.")
        if recipe is None:
            raise UsageError("--format tensorrt needs --recipe (input shape, batch sizes and calibration data).")
    model_cfg = recipe.model if recipe is not None else (read_model_config(model_ref) or _causal_lm_config(model_ref)
                                                         or ModelConfig())
    model = load_model(model_ref, model_cfg, trust_checkpoint=trust_checkpoint).cpu().eval()
    if getattr(model, "causal_lm", False):  # with its key/value cache (app/lm_deploy.py)
        return _export_language_model(model, model_ref, recipe, fmt=fmt, out=out, opset=opset)
    onnx_cfg = recipe.export.onnx if recipe is not None else OnnxConfig()
    if opset is not None:
        onnx_cfg = _with_opset(onnx_cfg, opset)
    base = Path(model_ref)
    target = out or (base / "model.onnx" if base.is_dir() else base.with_suffix(".onnx"))
    from compressor.rundir import check_output_file

    check_output_file(target, "--out" if out is not None else "the output (next to MODEL; choose one with --out)",
                      "model.onnx")
    info = export_onnx(model, example_inputs(model_cfg), target, onnx_cfg)
    verify_cfg = recipe.verify if recipe is not None else VerifyConfig()
    if recipe is not None:
        from compressor.train.data import build_datasets, sample_batch

        val_set = build_datasets(recipe.data, recipe.model, model_ref=str(model_ref), task=recipe.task)[1]
        samples, _ = sample_batch(val_set, verify_cfg.samples)
        source = f"{len(samples)} {recipe.data.kind} validation samples"
    # the task's parity rule (compressor/tasks: every output of a detector, the task's least relative tolerance)
    task = recipe.build_task() if recipe is not None else task_of_model(model, model_cfg.num_classes)
    if recipe is None:
        samples = task.random_inputs(model_cfg, min(verify_cfg.samples, 64))
        source = f"{len(samples)} random inputs (give --recipe to verify on real data)"
    rule = {"compare": task.compare, "rtol": task.rtol(verify_cfg.rtol)}
    try:
        info["parity"] = {**verify_onnx(model, target, samples, verify_cfg, **rule), "source": source}
    except Exception:
        remove_onnx(target)  # an export that failed verification is not left looking complete
        raise
    quantized = recipe.export.quantize.mode if recipe is not None and recipe.export.quantize.enabled else None
    engine_source = target
    if quantized:
        from compressor.app.quantization import quantize_for_export

        info["quantized"] = quantize_for_export(model, target, recipe, samples, model_ref=str(model_ref))
        engine_source = Path(info["quantized"]["path"])
    if fmt == "tensorrt":
        from compressor.train.data import build_datasets, sample_batch
        from compressor.deploy.tensorrt_engine import build_and_verify, settings_from_recipe

        settings = settings_from_recipe(recipe, **(trt_options or {}), quantized=quantized)
        calibration = None
        if settings.calib_samples:
            train_set = build_datasets(recipe.data, recipe.model, model_ref=str(model_ref), task=recipe.task)[0]
            calibration = sample_batch(train_set, settings.calib_samples)[0]
        info["tensorrt"] = build_and_verify(model, engine_source, samples, recipe, settings, calibration=calibration)
    return info


def _causal_lm_config(model_ref: str):
    """The model section of an hf:DIR causal LM exported without a recipe (token ids; the length only bounds the
    recipe checks: the export takes any), or None for other references."""
    from compressor.models.config import ModelConfig

    ref = str(model_ref)
    folder = Path(ref[3:]).expanduser() if ref.startswith("hf:") else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        from compressor.models.hf_causal_lm import names_causal_lm

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ImportError, OSError, ValueError, KeyError):
        return None  # load_model names what is wrong with the folder
    if not names_causal_lm(config):
        return None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 32
    return ModelConfig(inputs="tokens", input_shape=[min(32, int(limit))])


def _export_language_model(model, model_ref: str, recipe, *, fmt: str, out: Path | None,
                           opset: int | None) -> dict[str, Any]:
    """`compressor export` of a causal LM: MODEL's folder/model.onnx (an hf:DIR folder, a run or slim folder) or
    --out, with its key/value cache, verified at two prompt lengths (app/lm_deploy.export_language_model)."""
    from compressor.app.lm_deploy import export_language_model
    from compressor.errors import UsageError
    from compressor.rundir import check_output_file

    if fmt != "onnx":
        raise UsageError(f"--format {fmt}: a language model is exported to ONNX with its key/value cache and run on "
                         "ONNX Runtime; compressor builds no TensorRT engine for it.", hint="Use --format onnx.")
    ref = str(model_ref)
    base = Path(ref[3:]).expanduser() if ref.startswith("hf:") else Path(ref)
    target = out or (base / "model.onnx" if base.is_dir() else base.with_suffix(".onnx"))
    check_output_file(target, "--out" if out is not None else "the output (next to MODEL; choose one with --out)",
                      "model.onnx")
    return export_language_model(model, Path(target), recipe, ref, opset=opset)
