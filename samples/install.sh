#!/usr/bin/env bash
# Install compressor and the offline Fashion-MNIST data into a virtual environment. Idempotent; used by
# quickstart.sh, tests/run.sh and CI. The environment is $COMPRESSOR_VENV (default .venv in the repository),
# created with `python3 -m venv` when it does not exist, so nothing installed by hand elsewhere can stand in for a
# missing dependency. Activate it afterwards with `. .venv/bin/activate` to use the `compressor` command.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${COMPRESSOR_VENV:-.venv}"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist;
  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi
fi
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch 2.14.1 + torchvision 0.29.1 is the pair the project is tested with (the newest the pyproject admits).
case "$(uname -m)" in
  x86_64|amd64) "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1" ;;
esac
"${pip[@]}" -e ".[dev]"
