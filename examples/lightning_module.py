"""Prune a model while Lightning trains it, then deploy to a verified ONNX model.

A LightningModule fine-tunes the sample ResNet-20 on Fashion-MNIST with its own optimizer (SGD) and a per-step
cosine LR scheduler; `PruningCallback` (the [lightning] extra) prunes it with the recipe's DPM section to half of
its MACs while it trains. After each removal the callback remaps the optimizer in place, so the scheduler and
Lightning's optimizer wrapper keep working. `compressor.deploy` then exports the slim network to ONNX, checks
parity on the validation set, benchmarks it beside the dense network and reports.

    python examples/lightning_module.py
    python examples/lightning_module.py --train-subset 512 --epochs 1 --set prune.dpm.interval=2 --out runs/l-quick
"""
from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import compressor
from compressor.integrations.lightning import PruningCallback
from compressor.train.data import build_datasets


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        self.log("val_top1", (self(inputs).argmax(1) == targets).float().mean() * 100)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="samples/resnet20-fmnist.safetensors")
    parser.add_argument("--recipe", default="recipes/resnet20-fmnist-dpm.yaml",
                        help="its model, data and prune sections; its export, verify and bench sections for deploy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, as compress")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--val-subset", type=int, default=None)
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args(argv)

    subsets = [f"data.{k}_subset={v}" for k, v in (("train", args.train_subset), ("val", args.val_subset)) if v]
    recipe = compressor.load_recipe(args.recipe, [*subsets, *args.set])
    net = compressor.load_model(args.checkpoint, recipe.model)
    dense = copy.deepcopy(net)
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    batch = recipe.data.batch_size
    train_loader = DataLoader(train_set, batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(val_set, 256)

    example = torch.randn(1, *recipe.model.input_shape)
    callback = PruningCallback(example, prune=recipe.prune, ignore=[f"net.{name}" for name in recipe.model.ignore])
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = Classifier(net, lr=recipe.finetune.optimizer.lr)
    trainer.fit(module, train_loader, val_loader)
    # the callback re-estimated the batch-norm statistics on 32 training batches after the last removal, as compress does

    report = compressor.deploy(module.net.eval(), example, args.out, recipe=recipe, dense_model=dense,
                               val_set=val_set, pruner=callback.pruner, overwrite=True)
    removed = sum(event["removed"] for event in report["method"]["events"])
    target, top1 = report["target"], (report["dense"]["top1"], report["compressed"]["top1"])
    print(f"{removed} channels removed in {callback.pruner.step} optimizer steps: MACs "
          f"x{target['achieved_macs_ratio']:.3f} (asked {target['asked_macs_ratio']}), top-1 {top1[0]:.2f}% -> "
          f"{top1[1]:.2f}%; report and verified ONNX in {args.out}")
    return report


if __name__ == "__main__":
    main()
