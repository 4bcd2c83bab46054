#!/usr/bin/env bash
# Set up .venv (CPU torch, test extras) and run the linters and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check sslam_core sslam_cli scripts tests
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
