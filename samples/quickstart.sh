#!/usr/bin/env bash
# The README's first command: install (samples/install.sh, into .venv), then compress the sample ResNet-20
# (Fashion-MNIST) with the quickstart recipe into runs/quickstart. Extra arguments go to `compressor compress`
# (e.g. --set finetune.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
venv="${COMPRESSOR_VENV:-.venv}"
"$venv/bin/compressor" compress samples/resnet20-fmnist.safetensors --recipe recipes/resnet20-fmnist-dpm.yaml \
  --out runs/quickstart --overwrite "$@"
