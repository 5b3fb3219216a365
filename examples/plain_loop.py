"""Prune with DPM inside your own PyTorch training loop, with your own loss, then deploy to a verified ONNX model.

The loop below is plain PyTorch: a model, a DataLoader, SGD, a cosine learning rate, and a focal loss (Lin et al.
2017; not cross-entropy). Pruning adds five lines, marked `# compressor`: the Pruner and its four hooks (the last,
finalize, also re-estimates the batch-norm statistics on training batches, as compress does after pruning). The Pruner removes channels from
`model` in place while it trains and remaps the optimizer (its groups and momentum follow the kept channels), so the
loop never changes. `compressor.deploy` then exports the slim model to ONNX, checks parity on the validation set,
benchmarks it beside the dense model, and writes report.json / report.md.

    python examples/plain_loop.py                       # focal loss, the sample ResNet-20 on Fashion-MNIST
    python examples/plain_loop.py --loss ce --set prune.round_to=8     # the comparison with `compressor compress`

The loop mirrors `compressor compress`'s training loop (compressor/train/loop.py, fit) step for step, so that with
`--loss ce` the two can be compared on the same recipe: the data order and augmentation seeded per epoch with
seed * 100_003 + epoch, SGD with the recipe's settings and no weight decay on biases and norm parameters (1-d
tensors), the cosine learning-rate factor set before every step, and batch-norm statistics re-estimated on 32
training batches after the last removal. Run compress with `--set finetune.memory_format=contiguous` for that
comparison: like this loop, it then trains in PyTorch's default (NCHW) memory format.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import compressor
from compressor.train.data import build_datasets


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss: cross-entropy down-weighted by (1 - p_true)^gamma on the samples already classified well."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


LOSSES = {"focal": focal_loss, "ce": F.cross_entropy}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="samples/resnet20-fmnist.safetensors")
    parser.add_argument("--recipe", default="recipes/resnet20-fmnist-dpm.yaml",
                        help="its prune section and its fine-tuning hyper-parameters; its export, verify and bench "
                             "sections for deploy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, as compress")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="focal")
    parser.add_argument("--out", default="runs/plain-loop")
    args = parser.parse_args(argv)

    recipe = compressor.load_recipe(args.recipe, args.set)
    hp, batch_size = recipe.finetune, recipe.data.batch_size
    model = compressor.load_model(args.checkpoint, recipe.model)
    dense = copy.deepcopy(model)  # for the report's dense columns
    # Fashion-MNIST as compress reads it (the same samples, augmentation and data.train_subset); any Dataset works
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    loss_fn = LOSSES[args.loss]
    epochs, steps = hp.epochs, math.ceil(len(train_set) / batch_size)  # the budget: epochs of optimizer steps
    example = torch.randn(1, *recipe.model.input_shape)  # one input batch: the Pruner traces the model with it

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    sgd = torch.optim.SGD([{"params": decay, "weight_decay": hp.optimizer.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=hp.optimizer.lr,
                          momentum=hp.optimizer.momentum, nesterov=hp.optimizer.nesterov)

    def calibration(n: int):
        """n unshuffled batches of a seeded random subset of the training set (what compress re-estimates on)."""
        chosen = np.sort(np.random.RandomState(0).permutation(len(train_set))[: n * batch_size])
        loader = DataLoader(Subset(train_set, chosen.tolist()), batch_size, generator=torch.Generator().manual_seed(0))
        return itertools.islice(loader, n)

    torch.manual_seed(hp.seed)
    pruner = compressor.Pruner(model, example, prune=recipe.prune, epochs=epochs, steps_per_epoch=steps, optimizer=sgd)  # compressor
    step = 0
    for epoch in range(epochs):
        seed = hp.seed * 100_003 + epoch  # data order and augmentation: a function of (seed, epoch) only
        torch.manual_seed(seed)
        loader = DataLoader(train_set, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        model.train()
        for inputs, targets in loader:
            for group in sgd.param_groups:  # cosine from the recipe's lr to 0 over the whole run
                group["lr"] = hp.optimizer.lr * (0.5 * (1 + math.cos(math.pi * step / (epochs * steps))))
            sgd.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            pruner.after_backward(loss)  # compressor
            sgd.step()
            step += 1
            pruner.after_step()  # compressor
        pruner.epoch_end()  # compressor
        print(f"epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.4f}, {pruner.step} steps")
    # the last removals, then the batch-norm statistics re-estimated on training batches (as compress does)
    pruner.finalize(recalibrate=calibration, batches=hp.bn_recalibration.batches)  # compressor

    report = compressor.deploy(model.eval(), example, args.out, recipe=recipe, dense_model=dense, val_set=val_set,
                               pruner=pruner, overwrite=True)
    c, d = report["compressed"], report["dense"]
    print(f"top-1 {c['top1']:.2f}% (dense {d['top1']:.2f}%), MACs {c['macs'] / d['macs']:.3f} of dense, ONNX parity "
          f"{'passed' if report['parity']['onnx']['passed'] else 'FAILED'}: {args.out}")
    return report


if __name__ == "__main__":
    main()
