#!/usr/bin/env bash
# The prepared GPU check (a few minutes): DOLG-B5 at 768 px with AMP and channels_last on one GPU, next to the bare
# EfficientNet-B5, with nvidia-smi sampling utilisation. Needs only torch, torchvision, timm and pillow (no Ray, no
# pydantic). Writes benchmarks/results/gpu_check.json and BENCHMARKS.md.
#   bash benchmarks/gpu_check.sh [extra args for python -m benchmarks.gpu_check]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
log=$(mktemp)
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$log" &
smi=$!
trap 'kill $smi 2>/dev/null || true; rm -f "$log"' EXIT
timeout 420 "$python" -m benchmarks.gpu_check --nvidia-smi-log "$log" "$@"
