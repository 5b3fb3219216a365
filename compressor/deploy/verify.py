"""Output parity between artifacts (PyTorch vs ONNX Runtime vs TensorRT) on real validation samples."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from compressor.deploy.agreement import top1_agreement, top_classes
from compressor.deploy.config import VerifyConfig
from compressor.errors import ParityError


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max / mean absolute difference and top-1 agreement of two (N, classes, ...) outputs: per sample for logits,
    per pixel for a segmentation map; the agreement is None (not checked) for an output without classes."""
    if reference.shape != candidate.shape:
        raise ParityError(f"output shapes differ: PyTorch {reference.shape} vs export {candidate.shape}.")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    scale = float(np.abs(reference).max())
    classes = top_classes(reference)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": top1_agreement(reference, candidate),
            "max_abs_reference": scale, "relative_diff": float(diff.max()) / scale if scale > 0 else None,
            "samples": int(reference.shape[0]),
            "distinct_top1": None if classes is None else int(len(np.unique(classes))),
            "same_output_for_all": bool(len(reference) > 1 and np.all(reference == reference[:1]))}


def compare_all(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
    """compare_outputs for every output of a model (a detector's boxes and scores); with several, the one furthest
    off relative to its scale is reported, with all of them under "outputs"."""
    if len(reference) != len(candidate):
        raise ParityError(f"the export has {len(candidate)} outputs but the PyTorch model {len(reference)}.")
    results = [compare_outputs(r, c) for r, c in zip(reference, candidate)]
    if len(results) == 1:
        return results[0]
    worst = max(results, key=lambda m: m["max_abs_diff"] / (m["max_abs_reference"] or 1.0))
    return {**worst, "outputs": results}


@torch.no_grad()
def torch_outputs_all(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> list[np.ndarray]:
    """Every eval-mode output of the model (a tensor, or a tuple of them) on `inputs`, in slices of `batch_size`."""
    model = model.eval()
    parts = []
    for i in range(0, len(inputs), batch_size):
        out = model(inputs[i:i + batch_size])
        parts.append([o.float() for o in (out if isinstance(out, (tuple, list)) else (out,))])
    return [torch.cat(column).cpu().numpy() for column in zip(*parts)]


def torch_outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """The model's (first) eval-mode output on `inputs`."""
    return torch_outputs_all(model, inputs, batch_size)[0]


def check(metrics: dict[str, float], cfg: VerifyConfig, label: str, *, precision: str = "fp32",
          atol: Optional[float] = None, rtol: Optional[float] = None,
          min_agreement: Optional[float] = None) -> dict[str, Any]:
    """Attach tolerances and the verdict; ParityError when the export disagrees beyond them. The tolerances are
    the recipe's for `precision` unless given (quantized ONNX files pass their own relative ones)."""
    atol = {"fp32": cfg.atol, "fp16": cfg.fp16_atol, "int8": cfg.int8_atol}[precision] if atol is None else atol
    rtol = cfg.rtol if rtol is None else rtol
    allowed = atol + rtol * metrics.get("max_abs_reference", 0.0)  # scale: untrained logits reach 1e5-1e12
    agreement = min_agreement if min_agreement is not None else (
        cfg.min_top1_agreement if precision == "fp32" else cfg.reduced_min_top1_agreement)
    result = {**metrics, "atol": atol, "rtol": rtol, "allowed_abs_diff": allowed, "min_top1_agreement": agreement,
              "precision": precision, "artifact": label}
    agrees = metrics["top1_agreement"] is None or metrics["top1_agreement"] >= agreement
    result["passed"] = metrics["max_abs_diff"] <= allowed and agrees
    if (precision != "fp32" and metrics.get("distinct_top1") == 1 and metrics["samples"] > 1
            and not metrics.get("same_output_for_all")):  # reduced precision: agreement is half the check
        result["note"] = (f"{label}: the PyTorch model predicts the same class for all {metrics['samples']} samples, "
                          "so the top-1 agreement proves little; the max abs diff is the informative part.")
    if metrics.get("same_output_for_all"):
        result["note"] = (f"{label}: the PyTorch model gives the same output for all {metrics['samples']} samples "
                          "(an untrained model with a zero-initialised head does), so this parity check can not tell a "
                          "correct export from a wrong one; verify with trained weights.")
    if not result["passed"]:
        raise ParityError(
            f"{label} disagrees with the PyTorch model on {metrics['samples']} validation samples: max abs diff "
            f"{metrics['max_abs_diff']:.3g} (allowed {allowed:.3g} = atol {atol:g} + rtol {rtol:g} x max |output| "
            f"{metrics.get('max_abs_reference', 0.0):.3g}), " + (
                "no top-1 agreement (the output has no class axis)." if metrics["top1_agreement"] is None else
                f"top-1 agreement {metrics['top1_agreement']:.4f} (required {agreement})."),
            hint="The export is not written as verified; inspect the model for ops that export differently.")
    return result


def verify_onnx(model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor, cfg: VerifyConfig, *,
                compare: Optional[Callable[[list[np.ndarray], list[np.ndarray]], dict[str, Any]]] = None,
                rtol: Optional[float] = None) -> dict[str, Any]:
    """Run the ONNX file with ONNX Runtime (CPU) on `inputs` and compare every output with the PyTorch model's:
    `compare` is the task's rule (compressor/tasks: a detector's raw head tensors have no class axis), compare_all
    by default; `rtol` instead of the recipe's verify.rtol (the task's, for large dense outputs)."""
    from compressor.deploy.onnx_runtime import create_session, run_onnx_outputs

    session = create_session(onnx_path, "ort-cpu")
    reference = torch_outputs_all(model, inputs)
    candidate = run_onnx_outputs(session, inputs, batch_size=64, source=repr(Path(onnx_path).name))
    return check((compare or compare_all)(reference, candidate), cfg, f"ONNX {Path(onnx_path).name}", rtol=rtol)
