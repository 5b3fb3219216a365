"""Example predictions for the report of a detection or segmentation run: a few validation images with the ground
truth, the dense model's and the compressed model's predictions side by side (plot_examples.png), so a person sees
what the metric drop looks like, not only its size.

The images are a seeded choice (compressor.train.data.subset_indices, the same on every machine and rerun); both
models run on them on the CPU in eval mode. The figure is drawn here, from the tensors, because the report's other
plots are drawn from report.json alone and the images are not in it. report.json gets `examples`, plain JSON:
- detection: per image the ground-truth boxes and labels and each model's boxes, labels and scores above the
  display threshold (what the figure shows; boxes x0, y0, x1, y1 in input pixels);
- segmentation: no masks (an image's mask is H x W numbers); per image and model the pixels of each class and the
  pixel accuracy against the ground truth (pixels whose mask value is the ignore index do not count).
Class 0 of a segmentation is drawn transparent: compressor's mask data kind reserves it for the background.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from compressor import rundir

FIGURE = "plot_examples.png"
COUNT = 4  # images shown
DISPLAY_SCORE = 0.25  # detections drawn and stored: score above this (Ultralytics' predict default)
MAX_SHOWN = 50  # at most this many detections per image and model (highest scores)
TASKS = ("detection", "segmentation")


def class_names(dataset: Any, num_classes: int, task: str = "detection") -> list[str]:
    """`num_classes` display names: the dataset's `classes` (under any Subset wrappers) where it has them, numbers
    for the rest. A segmentation dataset that names only the classes after the background (class 0) gets
    "background" first."""
    from compressor.train.text import root_dataset

    given = [str(c) for c in (getattr(root_dataset(dataset), "classes", None) or [])] if dataset is not None else []
    if task == "segmentation" and given and len(given) == num_classes - 1:
        given = ["background", *given]
    return given[:num_classes] + [str(i) for i in range(len(given), num_classes)]


@dataclass
class Examples:
    """The chosen images and what each model predicts on them (CPU tensors)."""

    task: str
    indices: list[int]
    images: torch.Tensor  # (N, C, H, W) as the dataset gives them
    truth: list[Any]  # detection: {"boxes", "labels"}; segmentation: (H, W) int64 masks
    predictions: dict[str, list[Any]]  # "dense" / "compressed": detection dicts with scores, or (H, W) masks
    classes: list[str]
    ignore_index: Optional[int] = None
    threshold: float = DISPLAY_SCORE

    def summary(self, figure: str = FIGURE) -> dict[str, Any]:
        """What report.json keeps (see the module docstring)."""
        rows = []
        for row, index in enumerate(self.indices):
            entry: dict[str, Any] = {"index": index, "ground_truth": self._describe(self.truth[row])}
            for name, predicted in self.predictions.items():
                entry[name] = self._describe(predicted[row], self.truth[row])
            rows.append(entry)
        out = {"figure": figure, "task": self.task, "indices": list(self.indices), "models": list(self.predictions),
               "classes": list(self.classes), "images": rows}
        if self.task == "detection":
            out["score_threshold"] = self.threshold
        else:
            out["ignore_index"] = self.ignore_index
            out["masks"] = "not stored: drawn in the figure from the tensors"
        return out

    def _describe(self, value: Any, truth: Any = None) -> dict[str, Any]:
        if self.task == "detection":
            described = {"boxes": [[round(float(v), 2) for v in box] for box in value["boxes"].tolist()],
                         "labels": [int(c) for c in value["labels"].tolist()]}
            if "scores" in value:
                described["scores"] = [round(float(s), 4) for s in value["scores"].tolist()]
            return described
        valid = value != self.ignore_index
        described = {"class_pixels": torch.bincount(value[valid].flatten(), minlength=len(self.classes)).tolist()}
        if truth is not None:
            described["pixel_acc"] = round(pixel_accuracy(value, truth, self.ignore_index), 2)
        return described


def pixel_accuracy(mask: torch.Tensor, truth: torch.Tensor, ignore_index: Optional[int]) -> float:
    """Percent of the pixels `truth` does not ignore where `mask` has its class."""
    counted = truth != ignore_index
    return 100.0 * int((mask[counted] == truth[counted]).sum()) / max(int(counted.sum()), 1)


def collect_examples(task: Any, val_set: Any, model: nn.Module, dense_model: Optional[nn.Module] = None, *,
                     count: int = COUNT, seed: Optional[int] = None,
                     classes: Optional[Sequence[str]] = None) -> Optional[Examples]:
    """The examples of a detection or segmentation run: `count` seeded validation images and the predictions of
    `dense_model` (None: no dense column, as under deploy() without one) and `model` on them. None for other
    tasks or without a validation set. Both models are left as they were (mode and device)."""
    from compressor.train.data import SUBSET_SEED, subset_indices

    if task.name not in TASKS or val_set is None or len(val_set) == 0:
        return None
    indices = subset_indices(len(val_set), count, SUBSET_SEED if seed is None else seed)
    samples = [val_set[i] for i in indices]
    images = torch.stack([image for image, _ in samples]).float()
    names = list(classes) if classes is not None else class_names(val_set, task.num_classes, task.name)
    models = {"dense": dense_model, "compressed": model} if dense_model is not None else {"compressed": model}
    if task.name == "detection":
        truth = [{"boxes": t["boxes"].float().reshape(-1, 4), "labels": t["labels"].long().reshape(-1)}
                 for _, t in samples]
        predictions = {name: _detect(m, images) for name, m in models.items()}
        return Examples("detection", indices, images, truth, predictions, names)
    from compressor.tasks.segmentation import as_masks

    truth = list(as_masks(torch.stack([t for _, t in samples]), task.num_classes, task.ignore_index))
    predictions = {name: _segment(m, images, truth[0].shape) for name, m in models.items()}
    return Examples("segmentation", indices, images, truth, predictions, names, ignore_index=task.ignore_index)


def _eval_outputs(model: nn.Module, images: torch.Tensor) -> Any:
    """`model`'s eval-mode outputs on `images`, on the CPU; its mode and device are restored."""
    training = model.training
    device = next(iter(model.parameters()), torch.empty(0)).device
    model.cpu().eval()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.to(device).train(training)


def _detect(model: nn.Module, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    from compressor.tasks.boxes import postprocess

    return postprocess(_eval_outputs(model, images), model.output_layout, conf=DISPLAY_SCORE, max_det=MAX_SHOWN,
                       size=tuple(images.shape[-2:]))


def _segment(model: nn.Module, images: torch.Tensor, size: Sequence[int]) -> list[torch.Tensor]:
    from compressor.tasks.base import as_tensors
    from compressor.tasks.segmentation import logits_at

    logits = as_tensors(_eval_outputs(model, images))[0].float()
    return list(logits_at(logits, size).argmax(1))


# ---------------------------------------------------------------------------------------------- the figure
def write_figure(examples: Examples, out: Path, *, metrics: Optional[dict[str, str]] = None) -> Path:
    """plot_examples.png in `out` (written atomically). `metrics`: a column's caption under its model name (the
    model's primary metric on the whole validation set)."""
    fig = draw(examples, metrics or {})
    path = Path(out) / FIGURE
    with rundir.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def draw(examples: Examples, metrics: dict[str, str]):
    """Rows = images, columns = ground truth then each model; a matplotlib Figure (no pyplot)."""
    from matplotlib.figure import Figure

    columns = [("ground truth", examples.truth), *examples.predictions.items()]
    rows = len(examples.indices)
    panel = 2.6
    fig = Figure(figsize=(panel * len(columns), panel * rows + 0.9))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    if examples.task == "segmentation":  # class 0 (the background) is never coloured: class 1 gets the first colour
        colours = np.concatenate([np.zeros((1, 3)), palette(len(examples.classes) - 1)])
    else:
        colours = palette(len(examples.classes))
    shown: set[int] = set()
    for r, index in enumerate(examples.indices):
        picture = display_image(examples.images[r])
        if examples.task == "segmentation":  # dimmed grey under the class colours, which a textured image drowns
            picture = 0.3 + 0.5 * (picture if picture.ndim == 2 else picture @ np.array([0.299, 0.587, 0.114]))
        for c, (name, values) in enumerate(columns):
            ax = axes[r][c]
            # extent: pixel edges at whole numbers, as box coordinates count them
            extent = (0, picture.shape[1], picture.shape[0], 0)
            ax.imshow(picture, interpolation="nearest", cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1,
                      extent=extent)
            ax.set_xlim(0, picture.shape[1])
            ax.set_ylim(picture.shape[0], 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if examples.task == "detection":
                caption = _draw_boxes(ax, values[r], examples.classes, colours, truth=c == 0,
                                      threshold=examples.threshold)
            else:
                caption = _draw_mask(ax, values[r], examples.truth[r], colours, examples.ignore_index, truth=c == 0)
                shown |= set(values[r].unique().tolist())
            ax.set_xlabel(caption, fontsize=8)
            if r == 0:
                title = name if name == "ground truth" else f"{name} model"
                ax.set_title(title + (f"\n{metrics[name]}" if metrics.get(name) else ""), fontsize=10)
            if c == 0:
                ax.set_ylabel(f"val image {index}", fontsize=9)
    if examples.task == "segmentation":
        _legend(fig, examples, colours, shown)
        heading = "Example segmentations (class colours over the image in grey; background uncoloured)"
    else:
        heading = f"Example detections (boxes scoring above {examples.threshold:g}, with class and score)"
    fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    return fig


def palette(count: int) -> np.ndarray:
    """(count, 3) RGB colours in [0, 1], strong ones first: matplotlib's tab10, then tab20's lighter shades (their
    greys left out: they vanish on a grey image), then evenly spaced hues."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb

    tab20 = np.asarray(colormaps["tab20"].colors)
    tab10 = np.asarray(colormaps["tab10"].colors)
    colours = np.concatenate([np.delete(tab10, 7, 0), np.delete(tab20[1::2], 7, 0)])
    if count <= len(colours):
        return colours[:count]
    hues = (np.arange(count) * 0.618034) % 1.0  # golden-ratio steps keep neighbouring classes apart
    return hsv_to_rgb(np.stack([hues, np.full(count, 0.75), np.full(count, 0.95)], 1))


def display_image(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) or (H, W) floats in [0, 1]: a [0, 1] image as it is; a normalised one stretched to its range."""
    x = image.detach().float().cpu()
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        x = (x - low) / max(high - low, 1e-12)
    x = x.clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def _draw_boxes(ax, found: dict[str, torch.Tensor], classes: list[str], colours: np.ndarray, *, truth: bool,
                threshold: float) -> str:
    """The boxes, each with its class (and score) on its top edge: above it, or inside it when the box touches the
    image's top."""
    from matplotlib.patches import Rectangle

    height = ax.get_ylim()[0]
    scores = found.get("scores")
    for k, (box, label) in enumerate(zip(found["boxes"].tolist(), found["labels"].tolist())):
        x0, y0, x1, y1 = box
        colour = colours[label % len(colours)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2.0))
        text = classes[label] if label < len(classes) else str(label)
        if scores is not None:
            text += f" {float(scores[k]):.2f}"
        inside = y0 < 0.1 * height
        light = float(np.dot(colour[:3], [0.299, 0.587, 0.114])) > 0.6  # dark text on a light label
        ax.text(x0, y0, text, fontsize=7, color="black" if light else "white", va="top" if inside else "bottom",
                ha="left", clip_on=True, bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0, "alpha": 0.85})
    n = len(found["boxes"])
    if truth:
        return f"{n} object{'s' if n != 1 else ''}"
    return f"{n} box{'es' if n != 1 else ''}" if n else f"no box scoring above {threshold:g}"


def _draw_mask(ax, mask: torch.Tensor, reference: torch.Tensor, colours: np.ndarray, ignore_index: Optional[int],
               *, truth: bool) -> str:
    """The class mask over the image (class 0, the background, transparent; ignored pixels white); the caption:
    the pixel accuracy against the ground truth, or the number of classes present."""
    overlay = np.zeros((*mask.shape, 4))
    labels = mask.numpy()
    ignored = labels == ignore_index
    for label in np.unique(labels[~ignored]):
        if label == 0:
            continue
        overlay[labels == label] = (*colours[int(label) % len(colours)], 0.8)
    overlay[ignored] = (1.0, 1.0, 1.0, 0.8)
    ax.imshow(overlay, interpolation="nearest", extent=(0, labels.shape[1], labels.shape[0], 0))
    if truth:
        present = sorted(set(labels[~ignored].tolist()) - {0})
        return f"{len(present)} class{'es' if len(present) != 1 else ''} besides the background"
    return f"pixel accuracy {pixel_accuracy(mask, reference, ignore_index):.1f}%"


def _legend(fig, examples: Examples, colours: np.ndarray, shown: set[int]) -> None:
    """The classes that occur in any panel, with their colours, under the panels."""
    from matplotlib.patches import Patch

    labels = sorted(c for c in shown if c != examples.ignore_index and c != 0)
    handles = [Patch(facecolor=colours[c % len(colours)], alpha=0.8, label=examples.classes[c]) for c in labels]
    if any(bool((t == examples.ignore_index).any()) for t in examples.truth):
        handles.append(Patch(facecolor=(1.0, 1.0, 1.0), edgecolor="grey", label="ignored (not scored)"))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02 - 0.025 * ((len(handles) - 1) // 6)))
