"""Train the dense sample detector: Ultralytics YOLO11n from its YAML (no pretrained weights), on the Fashion-MNIST
scenes (samples/make_scenes.py), with Ultralytics' own trainer on the CPU, as a user of Ultralytics would.

    python samples/make_scenes.py --out data/scenes
    python samples/train_scenes_yolo.py --data data/scenes/data.yaml --epochs 60 --out samples/yolo11n-scenes.pt

Ultralytics is AGPL-3.0 (the `[yolo]` extra). Offline: plots and the AMP check are off, nothing is downloaded.
Resumable: rerun the same command after an interruption and it continues from the last epoch.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/scenes/data.yaml"))
    parser.add_argument("--model", default="yolo11n.yaml")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--project", type=Path, default=Path("runs/dense-yolo"))
    parser.add_argument("--out", type=Path, default=Path("samples/yolo11n-scenes.pt"))
    args = parser.parse_args()
    from ultralytics import YOLO

    last = args.project / "train" / "weights" / "last.pt"
    if last.is_file():
        model = YOLO(str(last))
        model.train(resume=True)
    else:
        model = YOLO(args.model)
        model.train(data=str(args.data.resolve()), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                    device="cpu", workers=0, amp=False, plots=False, pretrained=False, seed=args.seed,
                    deterministic=True, project=str(args.project.resolve()), name="train", exist_ok=True,
                    val=True, verbose=True)
    best = args.project / "train" / "weights" / "best.pt"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, args.out)
    metrics = YOLO(str(args.out)).val(data=str(args.data.resolve()), imgsz=args.imgsz, batch=args.batch,
                                      device="cpu", plots=False, workers=0)
    print(f"saved {args.out}: val mAP50-95 {metrics.box.map:.4f}, mAP50 {metrics.box.map50:.4f}")


if __name__ == "__main__":
    main()
