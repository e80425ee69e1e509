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
# DeepSpeed's CPU accelerator compiles a shared-memory op the first time it starts (about 50 s on 2 cores). Build
# it here, once, into this environment's extension folder (the one tests/run.sh and the tests point
# TORCH_EXTENSIONS_DIR at), so no training run or test waits for it. Needs a C++ compiler; without one only
# DeepSpeed on CPU is affected, so a failed build warns and the install goes on.
ext=.venv/torch_extensions
if ! ls "$ext"/deepspeed_shm_comm/*.so > /dev/null 2>&1; then
  DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$ext" .venv/bin/python -c \
    "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)" \
    > /dev/null 2>&1 || echo "setup_venv.sh: warning: DeepSpeed's CPU shared-memory op did not build (no C++ compiler?)" >&2
fi
