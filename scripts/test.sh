#!/usr/bin/env bash
# Set up .venv (CPU torch, test and docs extras), run the linters, build the documentation site
# strictly, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,docs
.venv/bin/ruff check sslam_core sslam_cli scripts tests docs/hooks
.venv/bin/ruff format --check sslam_core sslam_cli scripts tests docs/hooks
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
