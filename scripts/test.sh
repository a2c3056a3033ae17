#!/usr/bin/env bash
# The test suite in two lanes; exits non-zero on any failure, and when a lane ran no test (pytest's exit 5).
#   lane 1: the active Python (torch 2.13 unless you installed another), every test but tests/xla
#   lane 2: torch 2.9.0 + torch_xla 2.9.0 (scripts/xla_venv.sh, cached), the whole suite, XLA on the CPU
# KP_SKIP_XLA_LANE=1 skips lane 2 for a quick local run; CI (.ci/run) runs both. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."

lane() {  # lane NAME PYTHON PYTEST-ARGS...
  local name=$1 py=$2 start rc
  shift 2
  start=$(date +%s)
  PYTHONFAULTHANDLER=1 "$py" -m pytest -q -p no:cacheprovider "$@"  # a crash prints every thread's stack
  rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: $name collected no tests; treating that as a failure" >&2
    rc=1
  fi
  echo "scripts/test.sh: $name ($("$py" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)) exited $rc after $(( $(date +%s) - start )) s"
  return "$rc"
}

bash scripts/install.sh || exit 1
lane "lane 1" "${PYTHON:-python3}" --ignore=tests/xla "$@"
rc1=$?
if [ "${KP_SKIP_XLA_LANE:-0}" = "1" ]; then
  echo "scripts/test.sh: lane 2 (torch 2.9 + XLA:CPU) skipped by KP_SKIP_XLA_LANE=1"
  exit "$rc1"
fi
venv=$(bash scripts/xla_venv.sh) || { echo "scripts/test.sh: could not set up the torch 2.9 lane" >&2; exit 1; }
PJRT_DEVICE=CPU lane "lane 2" "$venv/bin/python" "$@"
rc2=$?
[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
