"""Accuracy of a model artifact (checkpoint, slim model or ONNX file) on a recipe's validation data."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from compressor.models.loading import load_model
from compressor.train.data import build_datasets, make_loader
from compressor.train.loop import evaluate
from compressor.train.metrics import evaluate_batches
from compressor.train.text import require_labels

if TYPE_CHECKING:
    from compressor.app.recipe import Recipe
    from compressor.tasks import Task


def evaluate_artifact(model_ref: str, recipe: Recipe, *, trust_checkpoint: bool = False,
                      device: str = "cpu") -> dict[str, float]:
    """Top-1/top-5 (percent) and mean cross-entropy of a .pt/.safetensors/slim model or a .onnx file. The model is
    loaded before the data is read, so a bad model file is named first."""
    batch = recipe.data.eval_batch_size or max(recipe.data.batch_size, 256)
    if str(model_ref).endswith(".onnx"):
        from compressor.deploy.runners import open_onnx_session

        task = recipe.build_task()
        if task.name == "language-modeling":  # a causal LM with its key/value cache (app/lm_deploy.py)
            from compressor.app.lm_deploy import evaluate_lm_onnx
            from compressor.deploy.lm_session import LMSession

            LMSession.open(Path(model_ref)).close()  # a file that is not one is named before the data is read
            _, val_set = build_datasets(recipe.data, recipe.model, model_ref=str(model_ref), task=recipe.task)
            return evaluate_lm_onnx(Path(model_ref), val_set, task)
        session = open_onnx_session(Path(model_ref), "ort-cpu")
        _, val_set = build_datasets(recipe.data, recipe.model, model_ref=str(model_ref), task=recipe.task)
        require_labels(val_set, "compressor eval")
        layout = onnx_detection_layout(session, Path(model_ref)) if task.name == "detection" else None
        return evaluate_onnx(Path(model_ref), val_set, batch_size=batch, session=session, task=task, model=layout)
    model = load_model(model_ref, recipe.model, trust_checkpoint=trust_checkpoint)
    _, val_set = build_datasets(recipe.data, recipe.model, model_ref=str(model_ref), task=recipe.task)
    require_labels(val_set, "compressor eval")
    return evaluate(model, val_set, batch_size=batch, device=device, task=recipe.build_task())


def onnx_detection_layout(session, path: Path) -> str:
    """A detector's output layout read off its exported file, where no PyTorch model tells it
    (compressor/tasks/boxes.py): one output is the "yolo" tensor (N, 4 + C, A), two are the "boxes_scores" pair."""
    from compressor.errors import UsageError

    names = [o.name for o in session.get_outputs()]
    if len(names) in (1, 2):
        return "yolo" if len(names) == 1 else "boxes_scores"
    raise UsageError(f"{path} has the outputs {', '.join(names)}; compressor evaluates a detector's raw export (one "
                     "(N, 4 + C, A) tensor, or boxes and scores).",
                     hint="Evaluate the run's model.onnx (compress reports the mAP of a model.nms.onnx itself).")


def evaluate_onnx(path: Path, dataset, *, batch_size: int = 256, session: Optional[object] = None,
                  metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
                  task: Optional["Task"] = None, model: Optional[torch.nn.Module | str] = None) -> dict[str, float]:
    """The same metrics as train.evaluate (one accumulation per task, compressor/tasks; the Python API's `metric`
    too), computed with ONNX Runtime on the CPU. `model`: the PyTorch model the file was exported from, for what
    the task reads off it (a detector's output layout), or that layout itself (onnx_detection_layout)."""
    from compressor.deploy.onnx_runtime import run_onnx_outputs
    from compressor.deploy.runners import open_onnx_session
    from compressor.train.loop import default_task

    session = session or open_onnx_session(path, "ort-cpu")

    def predict(inputs: torch.Tensor):
        outputs = [torch.from_numpy(o) for o in run_onnx_outputs(session, inputs, source=repr(Path(path).name))]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    evaluator = (task or default_task()).evaluator(model=model, metric=metric)
    return evaluate_batches(predict, make_loader(dataset, batch_size, shuffle=False, workers=0), evaluator=evaluator,
                            description="eval onnx")
