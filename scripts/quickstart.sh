#!/usr/bin/env bash
# Sets up .venv and runs the quickstart: synthetic GLDv2 in a local S3 server, streamed through the pipeline.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh local
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
exec .venv/bin/python jobs/quickstart.py "$@"
