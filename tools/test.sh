#!/bin/bash
# Set up (tools/setup.sh) and run the test suite; arguments go to pytest (e.g. -k infra, -x).
# The whole suite (no arguments) also runs the differential and semantic tests against stock
# pyfuse3 in a second venv (.venv-stock), where the daemon opens files the classic way.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
# pytest runs in a mount namespace of its own (tools/private-mounts.sh says why)
if [ $# -gt 0 ]; then
  exec tools/private-mounts.sh .venv/bin/python -m pytest -q "$@"
fi
tools/private-mounts.sh .venv/bin/python -m pytest -q
echo "test: the differential and semantic tests again, on stock pyfuse3 (.venv-stock)"
VENV=.venv-stock OVERLAYFUSE_STOCK_PYFUSE3=1 tools/setup.sh
# the stock run repeats the differential tests for the classic opens: fewer random examples
export OVERLAYFUSE_DIFF_RANDOM_EXAMPLES="${OVERLAYFUSE_STOCK_DIFF_RANDOM_EXAMPLES:-25}"
exec tools/private-mounts.sh .venv-stock/bin/python -m pytest -q tests/test_differential.py tests/test_semantics.py tests/test_fallocate.py
