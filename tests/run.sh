#!/usr/bin/env bash
# The test command of the README (and of CI): install, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash samples/install.sh
python -m pytest -q "$@"
