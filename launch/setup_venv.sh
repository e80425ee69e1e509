#!/usr/bin/env bash
# Create or reuse .venv and install moe_ep (editable) with its test extras, at the versions pinned in
# constraints.txt (the tested set; setup.py keeps ranges). torch 2.13.0 resolves to a local CPU wheel on the
# project's CPU machines, and to the CUDA build of the same release where one is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.moe_ep-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
    || [ launch/setup_venv.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -c constraints.txt pip
  .venv/bin/python -m pip install -q -c constraints.txt --build-constraint constraints.txt -e ".[test]"
  touch "$stamp"
fi
