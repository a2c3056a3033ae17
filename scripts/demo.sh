#!/usr/bin/env bash
# The main job: compile a small GPT with backend="kernelpytorch" (GPU if present, else CPU),
# print the explain table and the agreement with eager.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m kp_compiler.demo "$@"
