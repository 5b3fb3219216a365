#!/usr/bin/env bash
# The test command of the README (and of CI): install into the virtual environment (samples/install.sh), then run
# the whole suite with that environment's Python, one worker per CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
venv="${COMPRESSOR_VENV:-.venv}"
# one pytest-xdist worker per CPU this process may use (nproc honours the affinity mask); each test file is one group
# (tests/conftest.py), so a file's fixtures are built once; PYTEST_WORKERS=0 runs in one process
workers="${PYTEST_WORKERS:-$(nproc)}"
"$venv/bin/python" -m pytest -q -n "$workers" --dist loadgroup "$@"
