#!/usr/bin/env bash
# Refreshes constraints.txt: the exact version of every package the project installs (all extras but gpu), resolved
# afresh in a throw-away virtual environment. scripts/setup_venv.sh, cluster.yaml's image (k8s/Dockerfile) and CI
# install with `-c constraints.txt`, so every node and every test run gets these versions. Run it after changing a
# dependency in pyproject.toml, review the diff, run the tests, commit both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
"$tmp/venv/bin/pip" install -q ".[test]"
{
  echo "# Exact versions of everything the project installs; made by scripts/lock.sh on $(date -u +%Y-%m-%d) with"
  echo "# Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())'). Used as pip constraints (-c):"
  echo "# a package listed here installs at this version, one not listed (faiss-gpu) as pyproject.toml allows."
  "$tmp/venv/bin/pip" freeze --exclude-editable | grep -v '^ray-landmark'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
