#!/usr/bin/env bash
# The CPU runs behind docs/training.md, "Upcycling": a dense model (tiny-dense), then for each mode the MoE
# upcycled from its checkpoint (launch/train.py --upcycle-from) and the same MoE from scratch (--preset tiny with
# the same --moe fields, so the same ModelConfig), same seed, steps and batches. Then benchmarks/upcycle_report.py
# writes docs/data/upcycle.json and docs/img/upcycle_val_loss.png.
# Usage: bash benchmarks/upcycle_runs.sh [RUNS_DIR]   (default runs/upcycle; 12 min on the shared 2-core machine)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/upcycle}
PY=.venv/bin/python
COMMON=(--ep-size 2 --batch-size 8 --seq-len 128 --log-every 10 --val-every 25 --val-batches 8)
MOE=(--steps 150 --warmup 15 --seed 1)  # seed 1: other batches than the dense run's first ones
COARSE=(--moe n_routed_experts=8)  # 8 copies of the FFN, top-2
FINE=(--moe n_routed_experts=12 --moe num_experts_per_tok=3)  # m = 4: 1 shared + 4 copies of 3 routed slices, top-3
source benchmarks/torchrun_runs.sh  # run OUT SCRIPT ARGS...

run "$RUNS/dense" train.py --preset tiny-dense --steps 300 --warmup 30 --ckpt-every 300 --seed 0
run "$RUNS/upcycled_coarse" train.py --upcycle-from "$RUNS/dense" --upcycle coarse "${COARSE[@]}" "${MOE[@]}"
run "$RUNS/scratch_coarse" train.py --preset tiny "${COARSE[@]}" --moe moe_intermediate_size=384 \
  --moe n_shared_experts=0 --moe norm_topk_prob=True "${MOE[@]}"
run "$RUNS/upcycled_fine" train.py --upcycle-from "$RUNS/dense" --upcycle fine 4 "${FINE[@]}" "${MOE[@]}"
run "$RUNS/scratch_fine" train.py --preset tiny "${FINE[@]}" --moe moe_intermediate_size=96 \
  --moe routed_scaling_factor=3.0 --moe norm_topk_prob=True "${MOE[@]}"
"$PY" benchmarks/upcycle_report.py "$RUNS"
