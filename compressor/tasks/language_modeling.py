"""Language modeling: blocks of token ids (N, T) in, next-token logits (N, T, vocab) out (compressor/models/
hf_causal_lm.py wraps Hugging Face causal LMs so).

The target of a block is the block itself (compressor/train/text_corpus.py yields (block, block)): position t's
logits predict token t + 1, so the loss and the metrics compare logits[:, :-1] with ids[:, 1:]. A target id of
IGNORE_INDEX (-100, Hugging Face's convention for labels) is not predicted: a user's own dataset (data.kind: python)
can mark padding so.
Training: next-token cross-entropy, the mean over the predicted tokens.
Evaluation: perplexity = exp(summed NLL / predicted tokens) over the whole validation set (every rank's sums
gathered first: not a mean of per-batch or per-rank perplexities), with the mean NLL ("loss") and the next-token
accuracy ("token_acc", percent) beside it. Perplexity is lower-is-better (Task.higher_is_better is False).
Distillation: KL(teacher || student) of the softened next-token distributions at every position, averaged over the
positions, times T^2 (as the classification task's logit distillation).
Parity: the logits of an export against PyTorch's, with a relative tolerance (parity_rtol, times max |logit|) and
the top-1 agreement over the vocabulary axis (per position).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import DataError, ParityError
from compressor.tasks.base import Evaluator, Gather, Task, alone, as_tensors
from compressor.tasks.registry import TASKS

IGNORE_INDEX = -100  # a target id that is not predicted (Hugging Face's label convention)
HINT = ("task: language-modeling feeds (N, T) blocks of token ids to a model that returns (N, T, vocab) next-token "
        "logits (an hf:DIR causal LM), the block itself as its target (data.kind: text packs a corpus so).")


def shifted(outputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits[:, :-1] as float32 (N, T-1, V), ids[:, 1:] as int64 (N, T-1) on the logits' device): the predictions
    of every position and the tokens they predict; DataError when the shapes do not fit."""
    logits = as_tensors(outputs)[0]
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise DataError(f"language-modeling targets must be integer token ids (N, T), got {got}.", hint=HINT)
    if logits.dim() != 3 or targets.dim() != 2 or tuple(logits.shape[:2]) != tuple(targets.shape):
        raise DataError(f"language-modeling outputs of shape {list(logits.shape)} do not fit targets of shape "
                        f"{list(targets.shape)}: the model must return (N, T, vocab) logits for (N, T) token ids.",
                        hint=HINT)
    return logits[:, :-1].float(), targets[:, 1:].to(logits.device, torch.int64)


def _flat(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)


class LanguageModelingEvaluator(Evaluator):
    """Summed next-token NLL, correct top-1 predictions, predicted tokens, blocks and a user metric's sum (each
    batch's value times its blocks); compute() sums every rank's numbers before dividing."""

    def __init__(self, metric: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None) -> None:
        self.metric = metric
        self.nll, self.correct, self.tokens, self.blocks, self.metric_sum = 0.0, 0, 0, 0, 0.0

    @torch.no_grad()
    def update(self, outputs: Any, targets: Any) -> None:
        logits, ids = shifted(outputs, targets)
        flat_logits, flat_ids = _flat(logits, ids)
        valid = flat_ids != IGNORE_INDEX
        self.nll += float(F.cross_entropy(flat_logits, flat_ids, ignore_index=IGNORE_INDEX, reduction="sum")
                          .double())
        self.correct += int(((flat_logits.argmax(-1) == flat_ids) & valid).sum())
        self.tokens += int(valid.sum())
        self.blocks += int(ids.shape[0])
        if self.metric is not None:
            from compressor.train.metrics import metric_value

            self.metric_sum += metric_value(self.metric, as_tensors(outputs)[0], targets) * int(ids.shape[0])

    def compute(self, gather: Gather = alone) -> dict[str, float]:
        """{"perplexity", "loss" (mean NLL per predicted token), "token_acc" (percent), "tokens", "count" (blocks)}
        over every process's blocks; perplexity and loss are NaN when no token was predicted."""
        parts = gather((self.nll, self.correct, self.tokens, self.blocks, self.metric_sum))
        nll, correct, tokens, blocks, metric_sum = (sum(part[i] for part in parts) for i in range(5))
        if tokens:
            loss = nll / tokens
            try:
                perplexity = math.exp(loss)
            except OverflowError:  # an untrained model's NLL can exceed 709 nats
                perplexity = math.inf
            accuracy = 100.0 * correct / tokens
        else:
            loss = perplexity = math.nan
            accuracy = 0.0
        metrics = {"perplexity": perplexity, "loss": loss, "token_acc": accuracy, "tokens": int(tokens),
                   "count": int(blocks)}
        if self.metric is not None:
            metrics["metric"] = metric_sum / max(blocks, 1)
        return metrics


@TASKS.register("language-modeling")
class LanguageModeling(Task):
    primary, primary_label, primary_unit = "perplexity", "perplexity", ""
    higher_is_better = False  # a perplexity drop is an improvement
    count_label = "blocks"
    # a decoder's logits pass through every layer's float32 reductions (RMSNorm, softmax over the whole context),
    # which ONNX Runtime rounds differently in the last bits
    parity_rtol = 1e-4
    columns = (("perplexity", "perplexity", 3), ("loss", "NLL", 4), ("token_acc", "token acc. %", 2))

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__(num_classes)  # not used: the vocabulary is the model's

    # ------------------------------------------------------------------------------------------ training
    def criterion(self, outputs: Any, targets: Any, model: Optional[nn.Module] = None) -> torch.Tensor:
        """Next-token cross-entropy, the mean over the predicted tokens (not IGNORE_INDEX)."""
        logits, ids = shifted(outputs, targets)
        return F.cross_entropy(*_flat(logits, ids), ignore_index=IGNORE_INDEX)

    def distill(self, student: Any, teacher: Any, temperature: float) -> torch.Tensor:
        """KL(teacher || student) of the next-token distributions at `temperature`, summed over the vocabulary,
        averaged over the N x T positions, times T^2."""
        t = temperature
        s_logits, t_logits = as_tensors(student)[0].float(), as_tensors(teacher)[0].float()
        if s_logits.shape != t_logits.shape:
            raise ValueError(f"distillation: the student's logits have shape {tuple(s_logits.shape)}, the teacher's "
                             f"{tuple(t_logits.shape)}")
        s_flat, t_flat = s_logits.reshape(-1, s_logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1])
        return F.kl_div(F.log_softmax(s_flat / t, -1), F.log_softmax(t_flat / t, -1), log_target=True,
                        reduction="batchmean") * t * t

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluator(self, model: Optional[nn.Module] = None,
                  metric: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None) -> Evaluator:
        return LanguageModelingEvaluator(metric)

    def summary(self, metrics: dict[str, float]) -> str:
        return (f"perplexity {metrics['perplexity']:.3f} (NLL {metrics['loss']:.4f}, token accuracy "
                f"{metrics['token_acc']:.2f}%)")

    # ------------------------------------------------------------------------------------------ pruning
    def protected(self, model: nn.Module) -> list[str]:
        """The output projection onto the vocabulary (HFCausalLM.protected_modules): its rows are the tokens."""
        method = getattr(getattr(model, "module", model), "protected_modules", None)
        return list(method()) if callable(method) else []

    # ------------------------------------------------------------------------------------------ export
    def random_inputs(self, model_cfg: Any, count: int) -> torch.Tensor:
        """Seeded token ids in [0, compressor.tokens.TOKEN_ID_RANGE) of shape (count, T), T = model.input_shape's
        last entry (the block size)."""
        from compressor.tokens import TOKEN_ID_RANGE

        length = int(model_cfg.input_shape[-1])
        return torch.randint(0, TOKEN_ID_RANGE, (count, length), generator=torch.Generator().manual_seed(0))

    def compare(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
        return compare_logits(reference, candidate)


def compare_logits(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, Any]:
    """The parity numbers of an export's (N, T, vocab) logits (its first output) against PyTorch's, for
    deploy.verify.check: max / mean absolute difference, max |reference| (check allows atol + rtol times it), and
    the top-1 agreement over the vocabulary axis at every position."""
    if len(reference) != len(candidate):
        raise ParityError(f"the export has {len(candidate)} outputs, the PyTorch model {len(reference)}.")
    if not reference:
        raise ValueError("no outputs to compare")
    ref, cand = np.asarray(reference[0]), np.asarray(candidate[0])
    if ref.shape != cand.shape:
        raise ParityError(f"logits shapes differ: PyTorch {ref.shape} vs export {cand.shape}.")
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    worst = float(diff.max()) if diff.size else 0.0
    top = ref.argmax(-1) if ref.ndim >= 2 and ref.shape[-1] > 1 else None
    agreement = None if top is None else float(np.mean(top == cand.argmax(-1)))
    n = int(ref.shape[0]) if ref.ndim else 1
    return {"max_abs_diff": worst, "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "top1_agreement": agreement, "max_abs_reference": scale,
            "relative_diff": worst / scale if scale > 0 else None, "samples": n,
            "distinct_top1": None if top is None else int(len(np.unique(top))),
            "same_output_for_all": bool(n > 1 and np.all(ref == ref[:1]))}
