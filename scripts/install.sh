#!/usr/bin/env bash
# Install the project (and torch, if the active Python has none) into the active Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # The CPU wheel here; on a CUDA machine pip picks the matching build.
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
