#!/usr/bin/env bash
# Quickstart: set up .venv, then train the tiny MoE language model on 2 CPU processes with
# expert parallelism (ep 2): 400 steps, about 2-3 minutes on 2 cores. Extra arguments are
# passed to launch/train.py (e.g. --steps 100, --out DIR). See launch/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
OUT=runs/quickstart
.venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 launch/train.py \
  --preset tiny --ep-size 2 --steps 400 --log-every 20 --val-every 50 --ckpt-every 200 --out "$OUT" "$@"
echo "Plots: $OUT/loss.png $OUT/expert_load.png (metrics: $OUT/metrics.jsonl)"
