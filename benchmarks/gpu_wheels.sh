#!/usr/bin/env bash
# Wheels the GPU image lacks for gpu_check.sh's DeepSpeed baseline, into .whl/ (git-ignored; about 5 MB):
# DeepSpeed itself (pure Python, its C++ ops build just in time) and its pure-Python / CPython 3.12 needs
# (the image has Python 3.12 and torch, but no DeepSpeed, hjson or pydantic). Run it here, then carry
# .whl to the GPU machine: gpu_check.sh installs what it finds there with no index.
#
#   bash benchmarks/gpu_wheels.sh && <device run> carry=[".whl"] command="bash benchmarks/gpu_check.sh --out $OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
ls -la .whl
