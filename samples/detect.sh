#!/usr/bin/env bash
# The detection quickstart: install (samples/install.sh, into .venv), generate the offline Fashion-MNIST scenes
# (samples/make_scenes.py, deterministic, ~25 s), then compress the shipped dense YOLO11n to a measured x1.5 on
# ONNX Runtime with the shipped recipe into runs/detect. Prints mAP50-95 before / after and the speedup.
# Ultralytics is AGPL-3.0 (installed by the [yolo] extra, part of [dev]). Extra arguments go to `compressor compress`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
venv="${COMPRESSOR_VENV:-.venv}"
"$venv/bin/python" samples/make_scenes.py --out data/scenes
# the checkpoint is an Ultralytics pickle (a whole model object): --trust-checkpoint says we made it ourselves
"$venv/bin/compressor" compress samples/yolo11n-scenes.pt --trust-checkpoint --recipe recipes/yolo11n-scenes-dpm.yaml \
  --out runs/detect --overwrite "$@"
