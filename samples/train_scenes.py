"""Train a dense sample detector or segmenter on the Fashion-MNIST scenes (samples/make_scenes.py) from scratch,
with compressor's own training loop and the task's own loss (torchvision models; YOLO trains with Ultralytics'
trainer: samples/train_scenes_yolo.py).

    python samples/make_scenes.py --out data/scenes
    python samples/train_scenes.py --task segmentation --arch torchvision:lraspp_mobilenet_v3_large \\
        --epochs 30 --out samples/lraspp-scenes.safetensors
    python samples/train_scenes.py --task detection --arch torchvision:ssdlite320_mobilenet_v3_large \\
        --epochs 40 --out samples/ssdlite-scenes.safetensors

Resumable: rerun the same command after an interruption and it continues after the last finished epoch (the
state lies beside --out as *.train-state.pt). The validation metric is printed each epoch (mIoU or COCO mAP50-95).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from compressor.app.recipe import recipe_from_dict
from compressor.models.loading import build_arch
from compressor.train.data import build_datasets
from compressor.train.loop import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("detection", "segmentation"), required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--data", type=Path, default=Path("data/scenes"))
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bn-momentum", type=float, default=0.1,
                        help="batch-norm momentum while training from scratch (see below; 0 keeps the model's own)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    detection = args.task == "detection"
    recipe = recipe_from_dict({
        "name": "scenes-training", "task": args.task,
        "model": {"arch": args.arch, "num_classes": 10 if detection else 11, "input_shape": [3, args.size, args.size]},
        "data": {"kind": "coco" if detection else "masks", "root": str(args.data), "batch_size": args.batch_size},
        "prune": {"method": "none"},
        "finetune": {"epochs": args.epochs, "seed": args.seed,
                     "optimizer": {"kind": "adamw", "lr": args.lr, "weight_decay": 0.05},
                     "scheduler": {"kind": "cosine", "warmup_epochs": 1.0, "min_lr_ratio": 0.01}},
    })
    model = build_arch(args.arch, recipe.model.num_classes, recipe.model.in_channels)
    if args.bn_momentum:
        # torchvision's MobileNetV3 batch norms use momentum 0.01, made for long ImageNet schedules. From scratch,
        # in a few thousand steps, the running statistics lag the fast-moving weights: LRASPP trained with them
        # scored like an all-background predictor in eval mode (val mIoU 8.32% for 4 epochs) while its train-mode
        # outputs already found the objects. PyTorch's default 0.1 keeps the statistics up with the weights.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = args.bn_momentum
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    checkpoint = args.out.with_suffix(".train-state.pt")
    result = fit(model, train_set, val_set, recipe.finetune, recipe.data, checkpoint=checkpoint, resume=True,
                 task=recipe.build_task())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    task = recipe.build_task()
    print(f"saved {args.out}: val {task.summary({k[4:]: v for k, v in result.final.items() if k.startswith('val_')})}"
          f" after {args.epochs} epochs ({result.seconds / max(1, len(result.history)):.0f} s/epoch)")


if __name__ == "__main__":
    main()
