#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (slow end-to-end tests included) in two processes (pytest-xdist), a test
# file at a time each: one after another, the tests kept 1.4 of 2 cores busy, waiting on process starts and Ray's
# actors. The trained tiny models and the synthetic sets are made once for both, and the files go out longest first
# (tests/conftest.py; --no-loadscope-reorder keeps that order: pytest-xdist would send the files with most tests first).
# `bash scripts/test.sh -n 0` runs them in one process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh test
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
