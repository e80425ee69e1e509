#!/usr/bin/env bash
# Create or reuse .venv, install moe_ep with its test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
# DeepSpeed uses a small C++ op (setup_venv.sh builds it): keep it inside this venv, so checkouts sharing
# ~/.cache never wait on each other's (or a killed build's) lock.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
exec .venv/bin/python -m pytest tests "$@"
