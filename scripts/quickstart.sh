#!/usr/bin/env bash
# Sets up .venv and runs the quickstart: synthetic GLDv2 in a local S3 server, streamed through the pipeline.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh local
# Ray's token authentication on, as Ray 2.60 turns it on for a local Ray anyway; set here so that Ray does not
# warn about it. The token is ~/.ray/auth_token, created on first use.
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
exec .venv/bin/python jobs/quickstart.py "$@"
