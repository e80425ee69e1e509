#!/usr/bin/env bash
# Create or reuse .venv, install moe_ep with its test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
exec .venv/bin/python -m pytest tests "$@"
