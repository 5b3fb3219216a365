"""What ONNX Runtime's transformer optimizer fuses in an export (onnxruntime.transformers.optimizer): the count of
each fused operator (Attention, MultiHeadAttention, SkipLayerNormalization, Gelu, ...) for the dense and the pruned
ONNX of a transformer, so the report shows whether pruning broke a fusion the dense model had.

The optimizer works on a copy in memory; the exported files are not changed. `num_heads` / `hidden_size` are left to
its detection (0), since a pruned model's attention layers keep different head counts.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Optional

# Hugging Face config.model_type -> the optimizer's model type; other transformers use "bert", the generic encoder
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "vit": "vit", "deit": "vit", "swin": "swin"}


def optimizer_type(hf_model_type: Optional[str]) -> str:
    return MODEL_TYPES.get(str(hf_model_type or "").lower(), "bert")


def fused_operators(path: str | Path, model_type: str = "bert") -> dict[str, int]:
    """{fused operator: count} of the optimizer's fusions on `path`, only those it made at least once."""
    from onnxruntime.transformers.optimizer import optimize_model

    before = logging.root.manager.disable  # its fusion modules log under top-level names (fusion_attention, ...)
    logging.disable(logging.WARNING)  # e.g. a pruned layer's q/k/v narrower than its input: expected, not a fault
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0)
        stats = model.get_fused_operator_statistics()
    finally:
        logging.disable(before)
    return {op: int(n) for op, n in sorted(stats.items()) if n}


def fusion_report(dense: Path, pruned: Path, hf_model_type: Optional[str]) -> dict:
    """Fused operator counts of both exports and the operators whose count pruning changed."""
    kind = optimizer_type(hf_model_type)
    counts = {"dense": fused_operators(dense, kind), "compressed": fused_operators(pruned, kind)}
    changed = sorted(op for op in set(counts["dense"]) | set(counts["compressed"])
                     if counts["dense"].get(op, 0) != counts["compressed"].get(op, 0))
    return {"model_type": kind, **counts, "changed": changed}
