#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh test
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest "$@"
