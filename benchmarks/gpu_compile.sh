#!/usr/bin/env bash
# The prepared torch.compile check (sized for under 5 minutes on one H200 from the 118 s compile of docs/method.md
# §12.1; not yet run on a GPU): the training step of DOLG-B5 at 768 px and the B6-Swin-384 hybrid at 384 px, eager vs
# compiled, bf16, channels_last, and their losses over 20 steps. Needs only torch, torchvision, timm and pillow (no
# Ray, no pydantic). Writes benchmarks/results/gpu_compile.json and its BENCHMARKS.md section after each model, so a
# run cut short keeps the models it finished.
#   bash benchmarks/gpu_compile.sh [extra args for python -m benchmarks.gpu_compile, e.g. --models dolg_b5]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$python" -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__)"
timeout 420 "$python" -m benchmarks.gpu_compile "$@"
