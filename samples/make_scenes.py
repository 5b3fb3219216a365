"""Generate the offline detection + segmentation sample: Fashion-MNIST items on textured canvases
(compressor/datasets/scenes.py), as COCO JSON, YOLO labels, PNG masks and an Ultralytics data.yaml.

    python samples/make_scenes.py --out data/scenes            # 2000 train + 400 val images, 160 px

Deterministic: the same files on every machine for the same arguments.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from compressor.datasets.scenes import write_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/scenes"))
    parser.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    counts = write_scenes(args.out, fmnist_root=args.fashion_mnist, train=args.train, val=args.val, size=args.size,
                          seed=args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val scenes to {args.out} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
