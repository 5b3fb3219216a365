#!/usr/bin/env bash
# The test command of the README (and of CI): install into the virtual environment (samples/install.sh), then run
# the whole suite with that environment's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
venv="${COMPRESSOR_VENV:-.venv}"
"$venv/bin/python" -m pytest -q "$@"
