#!/bin/bash
# Set up (tools/setup.sh) and run the test suite; arguments go to pytest (e.g. -k infra, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
