"""The `text` data kind: CSV, JSONL or parquet files of text (and labels), tokenized with the model's tokenizer.

Every sample is padded (or truncated) to model.input_shape [sequence length] with the tokenizer's pad token; the
loaders cut each batch's trailing columns that are padding in every row (`trim_padding`), which the model's mask
(`input_ids != pad_token_id`, compressor/models/hf.py) makes exact. Labels are integers, or strings mapped to class
indices (data.text.labels gives the order; otherwise the sorted names of the training file). Without a label column
the samples are unlabelled: the compress pipeline labels them with the dense model's predictions (`pseudo_label`),
so top-1 reads as agreement with the dense model, and distillation from the dense model is the loss that teaches.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Subset

from compressor.errors import BackendUnavailable, DataError, RecipeError
from compressor.models.config import ModelConfig
from compressor.train.config import DataConfig

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
UNLABELLED = -1
TOKENIZER_DIR = "tokenizer"  # a compress run of a text model saves its tokenizer here, beside model.onnx


class TokenizedText(Dataset):
    """Token ids (N, S) int64 and labels (N,) int64 (UNLABELLED until `pseudo_label` fills them)."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, pad_token_id: int, classes: list[str],
                 source: str, tokenizer: Any = None) -> None:
        self.ids, self.labels, self.pad_token_id, self.classes, self.source = ids, labels, pad_token_id, classes, source
        self.tokenizer = tokenizer

    @property
    def labelled(self) -> bool:
        return bool((self.labels != UNLABELLED).all())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.ids[index], self.labels[index]


def root_dataset(dataset: Dataset) -> Dataset:
    """The dataset under any Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def trim_padding(batch: list, pad_token_id: int):
    """Collate (ids, label) pairs, then drop the trailing columns that are padding in every row (at least one kept)."""
    ids = torch.stack([b[0] for b in batch])
    labels = torch.as_tensor([int(b[1]) for b in batch])
    used = (ids != pad_token_id).any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return ids[:, :length].contiguous(), labels


def read_records(path: Path, field: str) -> list[dict[str, Any]]:
    """The rows of a CSV (header row), JSONL (one object per line) or parquet file as dicts."""
    if not path.is_file():
        raise DataError(f"{field}: {path} does not exist.", hint="Give a CSV, JSONL or parquet file of text samples.")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{field}: {path.name} is not a CSV, JSONL or parquet file (by its suffix).",
                        hint="Name it .csv, .jsonl or .parquet.")
    try:
        if kind == "csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark
                return list(csv.DictReader(fh))
        if kind == "jsonl":
            rows = []
            with path.open(encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise DataError(f"{field}: {path} line {number} is not a JSON object.")
                        rows.append(row)
            return rows
    except (UnicodeDecodeError, csv.Error, json.JSONDecodeError) as exc:
        raise DataError(f"{field}: {path} cannot be read as {kind} ({exc}).") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BackendUnavailable(f"{field}: reading {path.name} needs pyarrow.",
                                 hint="pip install 'compressor[hf]' (or pip install pyarrow).") from None
    try:
        return pq.read_table(str(path)).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError family for a file that is not parquet
        raise DataError(f"{field}: {path} cannot be read as parquet ({type(exc).__name__}: {exc}).") from None


def _column(rows: list[dict], name: str, field: str, path: Path) -> list[Any]:
    if not rows:
        raise DataError(f"{field}: {path} holds no rows.")
    missing = [i for i, row in enumerate(rows) if name not in row or row[name] is None]
    if missing:
        columns = ", ".join(sorted(rows[missing[0]].keys())) or "none"
        raise DataError(f"{field}: row {missing[0] + 1} of {path} has no {name!r} value (columns: {columns}).",
                        hint="Set data.text.text_column / data.text.label_column to the file's column names "
                             "(label_column: null for unlabelled text).")
    return [row[name] for row in rows]


def _index(value: Any) -> Optional[int]:
    """A label that is a class index: an int, an integral float (JSON's 1.0, parquet's float columns) or a string of
    digits; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def class_names(values: list[Any], given: Optional[list[str]]) -> list[str]:
    """The class order: data.text.labels, else none for index labels, else the sorted distinct names."""
    if given:
        return list(given)
    if all(_index(v) is not None for v in values):
        return []
    return sorted({str(v) for v in values})


def encode_labels(values: list[Any], classes: list[str], num_classes: int, path: Path) -> torch.Tensor:
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in values if str(v) not in index})
        if unknown:
            raise DataError(f"data.text: {path} has labels {unknown[:5]} that are not among the classes {classes[:10]}.",
                            hint="List every class in data.text.labels, or fix the file.")
        labels = [index[str(v)] for v in values]
    else:
        labels = [_index(v) for v in values]
    bad = sorted({v for v in labels if not 0 <= v < num_classes})
    if bad:
        raise DataError(f"data.text: {path} has class indices {bad[:5]} outside [0, {num_classes}) "
                        f"(model.num_classes is {num_classes}).",
                        hint="Set model.num_classes to the number of classes, or fix the labels.")
    return torch.as_tensor(labels, dtype=torch.int64)


def _model_tokenizer(model_ref: Optional[str]) -> Path:
    """Where the model keeps its tokenizer: an hf:DIR directory, or the tokenizer/ folder of a compress run."""
    ref = str(model_ref or "")
    if ref.startswith("hf:"):
        return Path(ref[3:]).expanduser()
    path = Path(ref)
    for folder in (path, path.parent):
        if ref and (folder / TOKENIZER_DIR).is_dir():
            return folder / TOKENIZER_DIR
    raise RecipeError(f"data.kind: text needs a tokenizer: {ref or 'the model'} is neither an hf:DIR reference nor "
                      f"a compress run with a {TOKENIZER_DIR}/ folder.",
                      hint="Set data.text.tokenizer to a directory holding the tokenizer files "
                           "(tokenizer.json or vocab.txt and tokenizer_config.json).")


def load_tokenizer(cfg: DataConfig, model_ref: Optional[str]):
    """The tokenizer of data.text.tokenizer, else of the hf:DIR model directory (nothing is downloaded)."""
    directory = cfg.text.tokenizer
    if directory is None:
        directory = _model_tokenizer(model_ref)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BackendUnavailable("data.kind: text needs transformers.",
                                 hint="pip install 'compressor[hf]' (or pip install transformers).") from None
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"no tokenizer loads from {directory} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}).",
                        hint="Point data.text.tokenizer at a directory with tokenizer.json (or vocab.txt) and "
                             "tokenizer_config.json, e.g. one written by tokenizer.save_pretrained.") from None


def text_dataset(cfg: DataConfig, model_cfg: ModelConfig, split: str, tokenizer, classes: Optional[list[str]]
                 ) -> TokenizedText:
    """One split tokenized to model.input_shape[0] tokens; `classes` from the training split (None: decide here)."""
    field = f"data.text.{split}"
    path = Path(getattr(cfg.text, split)).expanduser()
    rows = read_records(path, field)
    texts = [str(t) for t in _column(rows, cfg.text.text_column, field, path)]
    if tokenizer.pad_token_id is None:
        raise DataError(f"the tokenizer for {field} has no pad token; samples cannot be padded to one length.",
                        hint="Use a tokenizer with a pad token (BERT-style [PAD], RoBERTa's <pad>).")
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=int(model_cfg.input_shape[0]),
                    return_tensors="pt")["input_ids"].to(torch.int64)
    if cfg.text.label_column is None:
        labels = torch.full((len(texts),), UNLABELLED, dtype=torch.int64)
        classes = classes or []
    else:
        values = _column(rows, cfg.text.label_column, field, path)
        classes = class_names(values, cfg.text.labels) if classes is None else classes
        labels = encode_labels(values, classes, model_cfg.num_classes, path)
    return TokenizedText(ids, labels, int(tokenizer.pad_token_id), classes, str(path), tokenizer)


def text_datasets(cfg: DataConfig, model_cfg: ModelConfig, model_ref: Optional[str]) -> tuple[Dataset, Dataset]:
    if model_cfg.inputs != "tokens":
        raise RecipeError("data.kind: text feeds token ids; the recipe has model.inputs: image.",
                          hint="Set model.inputs: tokens and model.input_shape: [sequence length].")
    tokenizer = load_tokenizer(cfg, model_ref)
    train = text_dataset(cfg, model_cfg, "train", tokenizer, None)
    return train, text_dataset(cfg, model_cfg, "val", tokenizer, train.classes)


@torch.no_grad()
def pseudo_label(dataset: Dataset, model: torch.nn.Module, batch_size: int = 64) -> bool:
    """Label an unlabelled text set with `model`'s top-1 predictions (in place); True when it did."""
    base = root_dataset(dataset)
    if not isinstance(base, TokenizedText) or base.labelled:
        return False
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    for start in range(0, len(base), batch_size):
        ids, _ = trim_padding([base[i] for i in range(start, min(start + batch_size, len(base)))], base.pad_token_id)
        predictions.append(model(ids.to(device)).argmax(1).cpu())
    base.labels = torch.cat(predictions).to(torch.int64)
    model.train(was_training)
    return True


def require_labels(dataset: Dataset, command: str) -> None:
    """DataError when `dataset` is unlabelled text: `command` has no reference model to label it with."""
    base = root_dataset(dataset)
    if isinstance(base, TokenizedText) and not base.labelled:
        raise DataError(f"{command}: {base.source} is unlabelled (data.text.label_column: null), so there is no "
                        "accuracy to measure.",
                        hint="Give a labelled file (a label column), or run compressor compress, which labels "
                             "unlabelled text with the dense model's predictions.")
