#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras, every package at its constraints.txt
# version (scripts/lock.sh refreshes that file). Sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-cpu}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# torch and torchvision first, pinned to a build known to pair (an unpinned torch may pull a multi-GB CUDA build).
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || \
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
.venv/bin/pip install -q -c constraints.txt -e ".[${extras}]"
