"""Datasets and loaders: local files only (no download unless asked), seeded random subsets, per-kind presets.

Fashion-MNIST and MNIST are read directly from their gzip idx files (the Debian package
`dataset-fashion-mnist` installs them under /usr/share/datasets/fashion-mnist) into memory; augmentation runs
on tensors, so the in-memory kinds need no worker processes.
"""
from __future__ import annotations

import functools
import gzip
import importlib
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from compressor.errors import DataError
from compressor.models.config import ModelConfig
from compressor.tokens import TOKEN_ID_RANGE
from compressor.train.config import DataConfig

# Per-kind presets: folder name, file stems, normalisation and augmentation.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PRESETS = {
    "fashion-mnist": {"folder": "fashion-mnist", "mean": (0.2860,), "std": (0.3530,), "pad": 2, "flip": True},
    "mnist": {"folder": "mnist", "mean": (0.1307,), "std": (0.3081,), "pad": 2, "flip": False},
    "cifar10": {"folder": "cifar10", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "pad": 4, "flip": True},
    "cifar100": {"folder": "cifar100", "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762), "pad": 4, "flip": True},
    "imagefolder": {"folder": "imagefolder", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "pad": 0, "flip": True},
}
GET_IT = {
    "fashion-mnist": "install it with `apt-get install -y dataset-fashion-mnist` (Debian) or set data.root to a "
    "folder holding the four *-idx*-ubyte.gz files",
    "mnist": "set data.root to a folder holding the four MNIST *-idx*-ubyte(.gz) files, or data.download: true",
    "cifar10": "set data.root to the folder holding cifar-10-batches-py, or data.download: true",
    "cifar100": "set data.root to the folder holding cifar-100-python, or data.download: true",
    "imagefolder": "set data.root to a folder with train/ and val/ sub-folders of class folders",
}


def search_roots(cfg: DataConfig) -> list[Path]:
    """Where a dataset is looked for, in order: data.root, ./data, $COMPRESSOR_DATA, /usr/share/datasets."""
    if cfg.root is not None:
        return [Path(cfg.root).expanduser()]
    roots = [Path("data")]
    if os.environ.get("COMPRESSOR_DATA"):
        roots.append(Path(os.environ["COMPRESSOR_DATA"]).expanduser())
    roots.append(Path("/usr/share/datasets"))
    return roots


def _candidates(cfg: DataConfig) -> list[Path]:
    folder = PRESETS[cfg.kind]["folder"]
    return [p for root in search_roots(cfg) for p in (root / folder, root)]


def _missing(cfg: DataConfig) -> DataError:
    looked = ", ".join(str(p) for p in _candidates(cfg))
    return DataError(f"dataset {cfg.kind!r} not found; looked in: {looked}.", hint=f"To get it: {GET_IT[cfg.kind]}.")


# ---------------------------------------------------------------------------------------------- subsets
# Seed of every subset (data.train_subset, data.val_subset, verify.samples, INT8 calibration samples). Fixed, not
# finetune.seed: runs that differ only in their training seed (the benchmarks' 3 seeds) see the same samples, and
# `compress`, `eval`, `export` and `verify` pick the same samples from the same recipe.
SUBSET_SEED = 0


def subset_indices(size: int, count: int, seed: int = SUBSET_SEED) -> list[int]:
    """`count` distinct indices of range(size), drawn uniformly at random (not the first `count`: a class-sorted
    dataset such as an imagefolder would give one or two classes), sorted ascending so a subset reads its dataset
    in stored order. All of range(size) when count >= size.

    The draw uses its own numpy RandomState (never the global torch or numpy RNG), whose stream NumPy keeps frozen
    across versions: the same (size, count, seed) gives the same indices on every machine, DDP rank and resume.
    """
    if count >= size:
        return list(range(size))
    chosen = np.random.RandomState(seed).permutation(size)[:count]
    return np.sort(chosen).tolist()


# ---------------------------------------------------------------------------------------------- tensors
class TensorImages(Dataset):
    """uint8 images (N, C, H, W) and labels in memory; normalises and (optionally) pads-crops and flips."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, pad: int = 0, flip: bool = False) -> None:
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.pad, self.flip = pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.images[index].float().div_(255.0)
        if self.pad:
            h, w = x.shape[-2:]
            x = torch.nn.functional.pad(x, (self.pad,) * 4)
            i, j = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
            x = x[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[index]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()}).")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {data.size} bytes of data for shape {dims}.")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_dataset(cfg: DataConfig, split: str, augment: bool) -> TensorImages:
    preset = PRESETS[cfg.kind]
    for folder in _candidates(cfg):
        paths = [_find_idx(folder, stem) for stem in IDX_FILES[split]]
        if all(paths):
            images = torch.from_numpy(_read_idx(paths[0]).copy()).unsqueeze(1)
            labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
            if len(images) != len(labels):
                raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels.")
            return TensorImages(images, labels, preset["mean"], preset["std"],
                                pad=preset["pad"] if augment else 0, flip=preset["flip"] and augment)
    raise _missing(cfg)


def _cifar_dataset(cfg: DataConfig, split: str, augment: bool) -> TensorImages:
    from torchvision import datasets

    cls = datasets.CIFAR10 if cfg.kind == "cifar10" else datasets.CIFAR100
    preset = PRESETS[cfg.kind]
    for folder in _candidates(cfg):
        try:
            ds = cls(str(folder), train=split == "train", download=cfg.download)
        except RuntimeError:
            continue
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return TensorImages(images, torch.tensor(ds.targets), preset["mean"], preset["std"],
                            pad=preset["pad"] if augment else 0, flip=preset["flip"] and augment)
    raise _missing(cfg)


def _imagefolder_dataset(cfg: DataConfig, model_cfg: ModelConfig, split: str, augment: bool) -> Dataset:
    from torchvision import datasets, transforms

    preset = PRESETS["imagefolder"]
    size = model_cfg.input_shape[1:]
    for root in search_roots(cfg):
        folder = root / ("train" if split == "train" else "val")
        if folder.is_dir():
            steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if augment else [
                transforms.Resize([int(s * 1.143) for s in size]), transforms.CenterCrop(size)]
            if model_cfg.in_channels == 1:
                steps.insert(0, transforms.Grayscale())
            steps += [transforms.ToTensor(), transforms.Normalize(preset["mean"][: model_cfg.in_channels],
                                                                  preset["std"][: model_cfg.in_channels])]
            try:
                return datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
            except (FileNotFoundError, OSError) as exc:  # a class folder without images, an unreadable folder
                raise DataError(f"image folder {folder} cannot be used: {exc}",
                                hint="Every class folder needs at least one image (.jpg, .png, ...); remove empty "
                                     "class folders or add images.") from exc
    raise _missing(cfg)


class SyntheticImages(Dataset):
    """Seeded random images: Gaussian noise around one fixed random prototype per class (learnable, reproducible).

    A class's prototype depends only on the class index and the shape, so a train and a val set built with
    different seeds pose the same task; only the classes drawn are materialised (1000 ImageNet-sized prototypes
    would be 600 MB for an 8-image set).
    """

    def __init__(self, size: int, shape: list[int], num_classes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (size,), generator=gen)
        prototypes = {c: torch.randn(*shape, generator=torch.Generator().manual_seed(12345 + c))
                      for c in self.labels.unique().tolist()}
        noise = torch.randn(size, *shape, generator=gen)
        self.images = torch.stack([prototypes[c] for c in self.labels.tolist()]) + noise if size else noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


class SyntheticTokens(Dataset):
    """Seeded random token ids in [1, TOKEN_ID_RANGE) (never 0, BERT's pad id) with random labels: for timing and
    shape checks of text models, not for accuracy."""

    def __init__(self, size: int, shape: list[int], num_classes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (size,), generator=gen)
        self.ids = torch.randint(1, TOKEN_ID_RANGE, (size, *shape), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.ids[index], self.labels[index]


def _python_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    module_name, func_name = str(cfg.factory).split(":")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"data.factory {cfg.factory!r} cannot be imported: {exc}.") from exc
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise DataError(f"data.factory {cfg.factory!r} must return (train_dataset, val_dataset), got {type(result).__name__}.")
    return result


def build_datasets(cfg: DataConfig, model_cfg: ModelConfig, *, seed: int = SUBSET_SEED,
                   model_ref: Optional[str] = None, task: str = "classification") -> tuple[Dataset, Dataset]:
    """(train, val) datasets for the recipe; `data.train_subset` / `data.val_subset` keep a seeded random N samples
    (`subset_indices` with `seed`, SUBSET_SEED by default: the same samples on every machine, rank and resume).
    `model_ref`: the model reference, whose hf:DIR directory holds the tokenizer of the text kind. `task`: the
    recipe's task; with language-modeling the text kind reads unlabelled corpora (compressor/train/text_corpus.py)
    instead of labelled rows."""
    if cfg.kind == "text" and task == "language-modeling":
        from compressor.train.text_corpus import corpus_datasets

        train, val = corpus_datasets(cfg, model_ref)
    elif cfg.kind == "text":
        from compressor.train.text import text_datasets

        train, val = text_datasets(cfg, model_cfg, model_ref)
    elif cfg.kind in ("fashion-mnist", "mnist"):
        train, val = _idx_dataset(cfg, "train", cfg.augment), _idx_dataset(cfg, "val", False)
    elif cfg.kind in ("cifar10", "cifar100"):
        train, val = _cifar_dataset(cfg, "train", cfg.augment), _cifar_dataset(cfg, "val", False)
    elif cfg.kind == "imagefolder":
        train, val = (_imagefolder_dataset(cfg, model_cfg, s, cfg.augment and s == "train") for s in ("train", "val"))
    elif cfg.kind in ("coco", "yolo", "masks"):
        train, val = _annotated_datasets(cfg, model_cfg)
    elif cfg.kind == "synthetic" and model_cfg.inputs == "tokens":
        s = cfg.synthetic
        train = SyntheticTokens(s.train_size, model_cfg.input_shape, model_cfg.num_classes, s.seed)
        val = SyntheticTokens(s.val_size, model_cfg.input_shape, model_cfg.num_classes, s.seed + 1)
    elif cfg.kind == "synthetic":
        s = cfg.synthetic
        train = SyntheticImages(s.train_size, model_cfg.input_shape, model_cfg.num_classes, s.seed)
        val = SyntheticImages(s.val_size, model_cfg.input_shape, model_cfg.num_classes, s.seed + 1)
    else:
        train, val = _python_datasets(cfg)
    _check_sample(val, cfg, model_cfg)
    return keep_subsets(train, val, cfg, seed)


def _annotated_datasets(cfg: DataConfig, model_cfg: ModelConfig) -> tuple[Dataset, Dataset]:
    """kind: coco, yolo or masks (compressor/datasets): detection and segmentation sets, validated when read."""
    from compressor.datasets.coco import coco_datasets
    from compressor.datasets.masks import mask_datasets
    from compressor.datasets.yolo import yolo_datasets

    if model_cfg.inputs != "image":
        raise DataError(f"data.kind: {cfg.kind} gives images, but model.inputs is {model_cfg.inputs}.",
                        hint="Use an image model (model.inputs: image, input_shape [C, H, W]).")
    build = {"coco": coco_datasets, "yolo": yolo_datasets, "masks": mask_datasets}[cfg.kind]
    return build(cfg, num_classes=model_cfg.num_classes, shape=model_cfg.input_shape, roots=search_roots(cfg))


def keep_subsets(train: Dataset, val: Dataset, cfg: DataConfig, seed: int = SUBSET_SEED) -> tuple[Dataset, Dataset]:
    """`data.train_subset` / `data.val_subset`: a seeded random N samples of each set (all when not set); for the
    recipe's data kinds and for the datasets given to the Python API alike."""
    if cfg.train_subset is not None:
        train = Subset(train, subset_indices(len(train), cfg.train_subset, seed))
    if cfg.val_subset is not None:
        val = Subset(val, subset_indices(len(val), cfg.val_subset, seed))
    return train, val


def _check_sample(dataset: Dataset, cfg: DataConfig, model_cfg: ModelConfig) -> None:
    if len(dataset) == 0:
        raise DataError(f"the {cfg.kind} validation set is empty.")
    x, _ = dataset[0]  # detection (image, {"boxes", "labels"}) and segmentation (image, mask) samples alike
    if list(x.shape) != list(model_cfg.input_shape):
        raise DataError(
            f"{cfg.kind} samples have shape {list(x.shape)} but model.input_shape is {model_cfg.input_shape}; "
            "set model.input_shape (and model.in_channels) to match the data."
        )


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int, seed: int = 0,
                rank: int = 0, world: int = 1) -> DataLoader:
    """A loader whose order and augmentation depend only on `seed` (and the rank's shard under DDP)."""
    sampler = None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, generator=generator, drop_last=False,
                      persistent_workers=False, collate_fn=_collate(dataset))


def _collate(dataset: Dataset):
    """Text batches lose their all-padding tail columns (compressor/train/text.py); a dataset with a `collate`
    (detection: BoxTargets.collate) collates its own batches; others as usual."""
    from compressor.train.text import TokenizedText, root_dataset, trim_padding

    base = root_dataset(dataset)
    if isinstance(base, TokenizedText):
        return functools.partial(trim_padding, pad_token_id=base.pad_token_id)
    return getattr(base, "collate", None)


def sample_batch(dataset: Dataset, count: int, *, seed: int = SUBSET_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random `count` samples of a dataset as one batch (parity checks, INT8 calibration); the whole
    dataset, in order, when it holds no more than `count`. See `subset_indices`."""
    xs, ys = zip(*(dataset[i] for i in subset_indices(len(dataset), count, seed)))
    if all(isinstance(y, torch.Tensor) and y.ndim > 0 for y in ys):  # segmentation masks
        return torch.stack(xs), torch.stack(ys)
    if any(isinstance(y, dict) for y in ys):  # detection targets: one dict of boxes and labels per image
        return torch.stack(xs), list(ys)
    return torch.stack(xs), torch.as_tensor(ys)
