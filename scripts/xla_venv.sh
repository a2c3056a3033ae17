#!/usr/bin/env bash
# Prints the path of the torch 2.9 + torch_xla 2.9 virtual environment, creating it when missing.
# Kept between runs under $KP_VENV_CACHE (default ~/.cache/kernelpytorch), keyed by the versions
# (about 7 GB: torch 2.9.0's CUDA wheel, which also runs on the CPU, and torch_xla 2.9.0).
# The project is (re)installed into it editable on every call. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.9.0
XLA=2.9.0
venv="${KP_VENV_CACHE:-$HOME/.cache/kernelpytorch}/venv-torch$TORCH-xla$XLA"
check="import torch, torch_xla; assert torch.__version__.split('+')[0] == '$TORCH' and torch_xla.__version__.split('+')[0] == '$XLA'"
if ! PJRT_DEVICE=CPU "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
  echo "scripts/xla_venv.sh: creating $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q "torch==$TORCH" "torch_xla==$XLA" >&2
fi
"$venv/bin/python" -m pip install -q -e ".[test]" >&2
echo "$venv"
