"""Export: ONNX (named I/O, dynamic batch, checker, optional onnxslim). TensorRT engines build from the ONNX."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError
from .recipe import OnnxConfig
from .rundir import atomic_path

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, cfg: OnnxConfig, *,
                zipped: bool = False) -> dict[str, Any]:
    """Export `model` to `path` (written atomically), check it, and simplify it with onnxslim when asked. `zipped`:
    also measure the DEFLATE size (what unstructured zeros save; 24 s for ViT-B/16's two files, so only then)."""
    import onnx

    path = Path(path)
    model = model.eval()
    example = example.contiguous()
    dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if cfg.dynamic_batch else None
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath(False):
                warnings.simplefilter("ignore")
                if cfg.dynamo:
                    batch = torch.export.Dim("batch", min=1) if cfg.dynamic_batch else None
                    torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                      opset_version=cfg.opset, dynamo=True, external_data=False,
                                      dynamic_shapes=({0: batch},) if batch is not None else None)
                else:
                    torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                      opset_version=cfg.opset, dynamo=False, dynamic_axes=dynamic,
                                      do_constant_folding=True)
        except Exception as exc:  # the exporters raise many unrelated types; all mean "this model did not export"
            raise ExportError(f"ONNX export of the model failed ({type(exc).__name__}: {str(exc).splitlines()[0]}).",
                              hint="Try export.onnx.dynamo: true, another export.onnx.opset, or check custom ops.") from None
        try:  # from the file: no second serialisation of the whole model, and models over 2 GB check too
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported ONNX fails onnx.checker: {exc}") from None
        proto = onnx.load(str(tmp))
        simplified = False
        if cfg.simplify:
            proto, simplified = _simplify(proto)
            if simplified:
                onnx.save(proto, str(tmp))
    return {"path": str(path), "opset": cfg.opset, "bytes": path.stat().st_size,
            "zipped_bytes": zipped_size(path) if zipped else None, "nodes": len(proto.graph.node),
            "simplified": simplified, "dynamic_batch": cfg.dynamic_batch, "exporter": "dynamo" if cfg.dynamo else "torchscript"}


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    """nn.MultiheadAttention's inference fast path is one fused op (aten::_native_multi_head_attention) that the
    ONNX exporters cannot translate; exporting through the plain path gives the same function."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def zipped_size(path: str | Path) -> int:
    """Size of the file after DEFLATE (zlib level 9): what zeros from unstructured sparsity save on disk."""
    import zlib

    return len(zlib.compress(Path(path).read_bytes(), 9))


def _simplify(proto):
    """onnxslim when it is installed (the [dev] extra); the graph unchanged otherwise."""
    try:
        import onnxslim
    except ImportError:
        return proto, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnxslim.slim(proto), True
    except Exception:  # onnxslim is an optional optimiser: a failure keeps the checked, unsimplified graph
        return proto, False


def export_model(model_ref: str, recipe, *, fmt: str = "onnx", out: Path | None = None, opset: int | None = None,
                 trust_checkpoint: bool = False, trt_options: dict | None = None) -> dict[str, Any]:
    """`compressor export`: load a checkpoint or slim model, export it and verify the export.

    Parity uses the recipe's validation samples when a recipe is given, else seeded random inputs (said so).
    """
    from .errors import UsageError
    from .models import example_inputs, load_model
    from .recipe import ModelConfig, OnnxConfig, VerifyConfig
    from .slim import read_model_config
    from .verify import verify_onnx

    if fmt not in ("onnx", "tensorrt"):
        raise UsageError(f"--format {fmt!r}: use onnx or tensorrt.")
    if fmt == "tensorrt":
        from .tensorrt_engine import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            from .errors import BackendUnavailable

            raise BackendUnavailable(f"--format tensorrt needs TensorRT and an NVIDIA GPU, but {why}.",
                                     hint="Export to ONNX here and build the engine on the target device.")
        if recipe is None:
            raise UsageError("--format tensorrt needs --recipe (input shape, batch sizes and calibration data).")
    model_cfg = recipe.model if recipe is not None else read_model_config(model_ref) or ModelConfig()
    model = load_model(model_ref, model_cfg, trust_checkpoint=trust_checkpoint).cpu().eval()
    onnx_cfg = recipe.export.onnx if recipe is not None else OnnxConfig()
    if opset is not None:
        onnx_cfg = onnx_cfg.model_copy(update={"opset": opset})
    base = Path(model_ref)
    target = out or (base / "model.onnx" if base.is_dir() else base.with_suffix(".onnx"))
    info = export_onnx(model, example_inputs(model_cfg), target, onnx_cfg)
    verify_cfg = recipe.verify if recipe is not None else VerifyConfig()
    if recipe is not None:
        from .data import build_datasets, sample_batch

        samples, _ = sample_batch(build_datasets(recipe.data, recipe.model)[1], verify_cfg.samples)
        source = f"{len(samples)} {recipe.data.kind} validation samples"
    else:
        samples = torch.randn(min(verify_cfg.samples, 64), *model_cfg.input_shape, generator=torch.Generator().manual_seed(0))
        source = f"{len(samples)} random inputs (give --recipe to verify on real data)"
    try:
        info["parity"] = {**verify_onnx(model, target, samples, verify_cfg), "source": source}
    except Exception:
        Path(target).unlink(missing_ok=True)  # an export that failed verification is not left looking complete
        raise
    if fmt == "tensorrt":
        from .data import build_datasets, sample_batch
        from .tensorrt_engine import build_and_verify, settings_from_recipe

        settings = settings_from_recipe(recipe, **(trt_options or {}))
        calibration = None
        if settings.calib_samples:
            calibration = sample_batch(build_datasets(recipe.data, recipe.model)[0], settings.calib_samples)[0]
        info["tensorrt"] = build_and_verify(model, target, samples, recipe, settings, calibration=calibration)
    return info
