#!/usr/bin/env bash
# The test suite. Exits non-zero on any failure, and also when no test ran (pytest's exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
"${PYTHON:-python3}" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$rc"
