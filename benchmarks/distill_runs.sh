#!/usr/bin/env bash
# The CPU runs behind docs/distillation.md: two teachers, then for each case a student trained on labels
# alone (launch/train.py) and the same student distilled (launch/distill.py), same seed, steps and batches.
# Then benchmarks/distill_report.py writes docs/data/distill_*.json and docs/img/distill_val_loss.png.
# Usage: bash benchmarks/distill_runs.sh [RUNS_DIR]   (default runs/distill; about 40 min on 2 idle cores)
# A run whose folder already has wall_seconds (it finished) is kept, so an interrupted script can be restarted.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/distill}
PY=.venv/bin/python
COMMON=(--ep-size 2 --batch-size 8 --seq-len 128 --log-every 10 --val-every 25 --val-batches 8)
TEACHER=(--steps 600 --warmup 30 --ckpt-every 600 --seed 0)
STUDENT=(--steps 200 --warmup 20)
source benchmarks/torchrun_runs.sh  # run OUT SCRIPT ARGS...

run "$RUNS/teacher_moe" train.py --preset tiny "${TEACHER[@]}"
run "$RUNS/teacher_dense" train.py --preset tiny-dense "${TEACHER[@]}"
# (a) dense student, MoE teacher
run "$RUNS/a_labels" train.py --preset tiny-dense "${STUDENT[@]}"
run "$RUNS/a_kd" distill.py --teacher "$RUNS/teacher_moe" --student-preset tiny-dense "${STUDENT[@]}"
# (b) MoE student, dense teacher
run "$RUNS/b_labels" train.py --preset tiny "${STUDENT[@]}"
run "$RUNS/b_kd" distill.py --teacher "$RUNS/teacher_dense" --student-preset tiny "${STUDENT[@]}"
# Variants: the hidden-state, attention and relation terms added to KD; temperature 1
FEATURES=(--hidden-weight 1.0 --attention-weight 0.1 --relation-weight 1.0)
run "$RUNS/a_kd_features" distill.py --teacher "$RUNS/teacher_moe" --student-preset tiny-dense "${STUDENT[@]}" \
  "${FEATURES[@]}"
run "$RUNS/b_kd_features" distill.py --teacher "$RUNS/teacher_dense" --student-preset tiny "${STUDENT[@]}" \
  "${FEATURES[@]}"
run "$RUNS/a_kd_T1" distill.py --teacher "$RUNS/teacher_moe" --student-preset tiny-dense "${STUDENT[@]}" \
  --temperature 1
run "$RUNS/b_kd_T1" distill.py --teacher "$RUNS/teacher_dense" --student-preset tiny "${STUDENT[@]}" \
  --temperature 1
# Seed 1 (another student initialisation and data order) for (a): with seed 0 the student's embedding and
# attention start equal to the teacher's (weights are drawn per parameter name and seed)
run "$RUNS/a_labels_seed1" train.py --preset tiny-dense "${STUDENT[@]}" --seed 1
run "$RUNS/a_kd_features_seed1" distill.py --teacher "$RUNS/teacher_moe" --student-preset tiny-dense \
  "${STUDENT[@]}" "${FEATURES[@]}" --seed 1
"$PY" benchmarks/distill_report.py "$RUNS"
