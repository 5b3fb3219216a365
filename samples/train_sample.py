"""Train the sample checkpoint: CIFAR-style ResNet-20 on the full Fashion-MNIST training set.

    python samples/train_sample.py --epochs 15 --out samples/resnet20-fmnist.safetensors

Uses compressor's own data loader and training loop (SGD nesterov, cosine LR, pad-crop + flip augmentation).
The test accuracy written in the README is measured afterwards by `compressor eval`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from compressor.train.data import build_datasets
from compressor.models.loading import build_arch
from compressor.app.recipe import recipe_from_dict
from compressor.train.loop import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("samples/resnet20-fmnist.safetensors"))
    args = parser.parse_args()
    recipe = recipe_from_dict({
        "name": "sample-training",
        "model": {"arch": "zoo:resnet20", "num_classes": 10, "in_channels": 1, "input_shape": [1, 28, 28]},
        "data": {"kind": "fashion-mnist", "batch_size": args.batch_size, "train_subset": args.train_subset},
        "prune": {"method": "none"},
        "finetune": {"epochs": args.epochs, "seed": args.seed,
                     "optimizer": {"kind": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
                     "scheduler": {"kind": "cosine", "warmup_epochs": 0.5}},
    })
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    checkpoint = args.out.with_suffix(".train-state.pt")
    result = fit(model, train_set, val_set, recipe.finetune, recipe.data, checkpoint=checkpoint, resume=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"saved {args.out}: val top-1 {result.final['val_top1']:.2f}% after {args.epochs} epochs "
          f"({result.seconds / max(1, len(result.history)):.0f} s/epoch)")


if __name__ == "__main__":
    main()
