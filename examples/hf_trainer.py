"""Prune a Hugging Face model while `transformers.Trainer` trains it, then deploy to a verified ONNX model.

A small ResNet built from a `ResNetConfig` (nothing is downloaded) learns Fashion-MNIST with the Trainer's own
loop, optimizer (AdamW), linear LR schedule and gradient accumulation; `PruningCallback` prunes it with DPM to a
MAC target while it trains (the [hf] extra). The callback's Pruner holds the model as a module that returns logits
(`callback.pruner.model`), which `compressor.deploy` exports to ONNX, checks for parity on the validation set,
benchmarks and reports.

    python examples/hf_trainer.py                        # 3 epochs on 10,000 training images
    python examples/hf_trainer.py --train-subset 512 --epochs 1 --out runs/hf-quick
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

import compressor
from compressor.integrations.transformers import PruningCallback
from compressor.models.config import ModelConfig
from compressor.train.config import DataConfig
from compressor.train.data import build_datasets

PRUNE = {  # the prune section of a recipe, as a dict: DPM around the DepGraph host, to 60% of the MACs
    "method": "dpm", "host": "depgraph", "importance": {"kind": "magnitude"}, "target": {"macs": 0.6},
    "round_to": 8, "schedule": {"events": 1, "start_epoch": 0, "end_epoch": 1},
    "dpm": {"steps": 4, "interval": 4},
}


class PixelValues(Dataset):
    """(image, label) pairs as the dicts a Hugging Face image classifier takes."""

    def __init__(self, pairs: Dataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image, label = self.pairs[index]
        return {"pixel_values": image, "labels": label}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10_000)
    parser.add_argument("--val-subset", type=int, default=2_000)
    parser.add_argument("--out", default="runs/hf-trainer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="deploy setting (export, verify, bench), e.g. bench.min_runs=5")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                          layer_type="basic", num_labels=10)
    model = ResNetForImageClassification(config)
    shape = ModelConfig(num_classes=10, in_channels=1, input_shape=[1, 28, 28])
    train_set, val_set = build_datasets(DataConfig(kind="fashion-mnist", train_subset=args.train_subset,
                                                   val_subset=args.val_subset), shape)

    example = torch.randn(1, 1, 28, 28)  # one input batch: the Pruner traces the model with it
    callback = PruningCallback(example, prune=PRUNE)
    training = TrainingArguments(output_dir=f"{args.out}.trainer", num_train_epochs=args.epochs,
                                 per_device_train_batch_size=32, gradient_accumulation_steps=2, learning_rate=3e-3,
                                 use_cpu=True, save_strategy="no", report_to=[], logging_steps=20,
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=PixelValues(train_set), callbacks=[callback])
    trainer.train()

    deployment = {"verify": {"samples": 128}, "bench": {"backends": ["ort-cpu"], "batch_sizes": [1]}}
    report = compressor.deploy(callback.pruner.model, example, args.out, recipe=deployment, val_set=val_set,
                               pruner=callback.pruner, overwrite=True, overrides=args.set)
    c = report["compressed"]
    print(f"top-1 {c['top1']:.2f}%, {c['macs'] / 1e6:.2f} M MACs, {c['params']} parameters, ONNX parity "
          f"{'passed' if report['parity']['onnx']['passed'] else 'FAILED'}: {args.out}")
    return report


if __name__ == "__main__":
    main()
