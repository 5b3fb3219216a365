"""The recipe's data and finetune sections."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from compressor.config import Strict


class SyntheticConfig(Strict):
    train_size: int = Field(512, gt=0)
    val_size: int = Field(256, gt=0)
    seed: int = 0


DEFAULT_TEXT_EXTENSIONS = [".txt", ".md", ".py", ".rst"]


class TextDataConfig(Strict):
    train: Optional[Path] = Field(None, description="CSV, JSONL or parquet file of training text (task "
                                  "language-modeling: a plain-text file, or a folder of them)")
    val: Optional[Path] = Field(None, description="CSV, JSONL or parquet file of validation text (task "
                                "language-modeling: a plain-text file, or a folder of them)")
    text_column: str = "text"
    label_column: Optional[str] = Field("label", description="null: unlabelled text (the dense model's predictions "
                                        "become the labels; use finetune.distill)")
    labels: Optional[list[str]] = Field(None, description="class names in index order, for string labels")
    tokenizer: Optional[Path] = Field(None, description="tokenizer directory; default: the hf:DIR model's own")
    block_size: int = Field(256, gt=1, description="task language-modeling: tokens per training block (the corpus "
                            "is packed into non-overlapping blocks of this many tokens; model.input_shape: "
                            "[block_size])")
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_TEXT_EXTENSIONS),
                                  description="task language-modeling: the file suffixes read from a folder "
                                  "corpus (a file given by name is read whatever its suffix)")

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one file suffix, e.g. ['.txt']")
        suffixes = []
        for item in v:
            suffix = item.strip().lower()
            suffix = suffix if suffix.startswith(".") else "." + suffix
            if suffix == "." or "/" in suffix or "\\" in suffix:
                raise ValueError(f"{item!r} is not a file suffix (e.g. '.txt')")
            suffixes.append(suffix)
        return suffixes


class CocoDataConfig(Strict):
    """kind: coco. Unset paths default to the layout under data.root (compressor.datasets.scenes writes it)."""
    train_images: Optional[Path] = Field(None, description="folder of training images; default root/images/train")
    train_annotations: Optional[Path] = Field(None, description="COCO detection JSON; default "
                                              "root/annotations/instances_train.json")
    val_images: Optional[Path] = Field(None, description="folder of validation images; default root/images/val")
    val_annotations: Optional[Path] = Field(None, description="COCO detection JSON; default "
                                            "root/annotations/instances_val.json")


class MaskDataConfig(Strict):
    """kind: masks. A mask is a single-channel PNG with its image's stem: class indices 0..model.num_classes-1
    (0 is the background) or ignore_index."""
    train_images: Optional[Path] = Field(None, description="default root/images/train")
    train_masks: Optional[Path] = Field(None, description="default root/masks/train")
    val_images: Optional[Path] = Field(None, description="default root/images/val")
    val_masks: Optional[Path] = Field(None, description="default root/masks/val")
    ignore_index: int = Field(255, ge=0, description="mask value of pixels no loss or metric counts")


DataKind = Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "python", "text",
                   "coco", "yolo", "masks"]


class DataConfig(Strict):
    kind: DataKind = "synthetic"
    root: Optional[Path] = Field(None, description="default search: ./data, $COMPRESSOR_DATA, /usr/share/datasets")
    download: bool = False
    factory: Optional[str] = Field(None, description="for kind: python, 'pkg.mod:build' -> (train, val) datasets")
    batch_size: int = Field(128, gt=0)
    eval_batch_size: Optional[int] = Field(None, gt=0)
    workers: int = Field(0, ge=0)
    train_subset: Optional[int] = Field(None, gt=0, description="a seeded random N training samples (fixed seed "
                                        "compressor.train.data.SUBSET_SEED: the same samples on every machine, DDP rank "
                                        "and resume); all of them when N >= the set's size")
    val_subset: Optional[int] = Field(None, gt=0, description="a seeded random N validation samples (fixed seed, as "
                                      "train_subset); all of them when N >= the set's size")
    augment: bool = True
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    text: TextDataConfig = Field(default_factory=TextDataConfig)
    coco: CocoDataConfig = Field(default_factory=CocoDataConfig)
    yolo: Optional[Path] = Field(None, description="kind: yolo, an Ultralytics dataset YAML (path, train, val, "
                                 "names); default root/data.yaml")
    masks: MaskDataConfig = Field(default_factory=MaskDataConfig)

    @model_validator(mode="after")
    def _factory(self) -> "DataConfig":
        if self.kind == "text" and (self.text.train is None or self.text.val is None):
            raise ValueError("kind: text needs data.text.train and data.text.val (CSV, JSONL or parquet files; for "
                             "task language-modeling, text files or folders)")
        if self.kind == "python" and not self.factory:
            raise ValueError("kind: python needs data.factory: 'pkg.module:build'")
        if self.factory and not re.fullmatch(r"[\w.]+:[\w]+", self.factory):
            raise ValueError(f"factory {self.factory!r} must look like 'pkg.module:function'")
        return self


class OptimizerConfig(Strict):
    kind: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = True
    betas: list[float] = Field([0.9, 0.999])

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("must be two numbers in [0, 1)")
        return v


class SchedulerConfig(Strict):
    kind: Literal["cosine", "multistep", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[float] = Field([0.5, 0.75], description="multistep: fractions of training in (0,1)")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v) or v != sorted(v):
            raise ValueError("must be increasing fractions of training in (0, 1)")
        return v


class DistillConfig(Strict):
    enabled: bool = False
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0)


class BNRecalibrationConfig(Strict):
    enabled: bool = Field(True, description="after a pruning method's last change to the model, re-estimate the "
                                            "batch-norm running statistics on training batches (no training)")
    batches: int = Field(32, gt=0, description="training batches (data.batch_size each) to average them over")


class FinetuneConfig(Strict):
    epochs: int = Field(10, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    amp: bool = Field(False, description="mixed precision: float16 autocast with a gradient scaler on CUDA (gradients "
                                         "are unscaled before pruning hooks; overflow steps are skipped), bfloat16 "
                                         "autocast on CPU (fast only on CPUs with native bf16, e.g. AMX or "
                                         "AVX512-BF16; elsewhere it can be slower than float32)")
    grad_clip: Optional[float] = Field(None, gt=0.0)
    bn_recalibration: BNRecalibrationConfig = Field(default_factory=BNRecalibrationConfig)
    memory_format: Literal["auto", "contiguous"] = Field(
        "auto", description="CPU training memory format: auto measures channels-last against contiguous per "
        "structure (train/memory_format.py; the two round differently, so runs on machines that choose differently "
        "differ in the last bits); contiguous always trains NCHW, as a plain PyTorch loop does (bit-for-bit "
        "comparisons with examples/plain_loop.py, the same float path on every machine)")
    seed: int = 0
