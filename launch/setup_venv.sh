#!/usr/bin/env bash
# Create or reuse .venv and install moe_ep (editable) with its test extras.
# torch is pinned to 2.13.0: on the project's CPU machines that resolves to a local
# CPU wheel, while an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.moe_ep-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ launch/setup_venv.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
