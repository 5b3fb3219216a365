#!/usr/bin/env bash
# Install compressor and the offline Fashion-MNIST data. Idempotent; used by quickstart.sh, tests/run.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist;
  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi
fi
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
