#!/usr/bin/env bash
# One prepared GPU check (at most 9 minutes on one H100/H200): the compiled kernel tests, the grouped-GEMM
# benchmark on DeepSeek expert shapes, the layer benchmark against DeepSpeed at ep 1, the sync-free layer
# eager, compiled and captured in a CUDA graph, and 200 training steps of the tiny model. Writes OUT/*.json (OUT: --out, default runs/gpu) and prints one summary table.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--python PY] [--smoke]
#
# --smoke runs every step at toy sizes on whatever device is there (CPU included): the test suite uses it
# to keep this script working. Wheels in .whl/ (e.g. DeepSpeed and its pure-Python dependencies, which the
# GPU image lacks; see docs/performance.md) are installed first, with no index, into a private folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu
PY=python3
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, remember failures, go on
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}" >> "$OUT/steps.jsonl"
  [ "$rc" -eq 0 ] || status=1
}
: > "$OUT/steps.jsonl"
TRAIN=$(mktemp -d)  # the run's plots and run.json stay out of OUT (a device call brings back 8 files at most)

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import moe_ep.kernels" 2> /dev/null; then  # the image has torch and triton: add moe_ep only
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || { echo "cannot install moe_ep"; exit 1; }
fi
"$PY" - <<'EOF' | tee -a "$LOG"
import torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}")
EOF

if [ "$SMOKE" -eq 1 ]; then
  step kernel_tests 600 "$PY" -m pytest -q -x tests/kernels/test_gathered_gemm.py -k "gelu and contiguous"
  step grouped_gemm 600 "$PY" benchmarks/bench_grouped_gemm.py --quick --tokens 16 --dists uniform --modes fwd \
    --out "$OUT/grouped_gemm.json"
  step layer 600 "$PY" benchmarks/bench_layer.py --quick --configs e16k2 --ep 1 --iters 1 --warmup 0 --tokens 64 \
    --impls moe_ep dense_bound \
    --hidden 32 --ffn 32 --json "$OUT/layer.json"
  step sync_free 600 "$PY" benchmarks/bench_sync_free.py --tiny --backend aot_eager --modes expert_position \
    --check-steps 1 --iters 1 --json "$OUT/sync_free.json"
  step train 600 "$PY" launch/train.py --preset tiny --steps 4 --batch-size 2 --seq-len 16 --val-every 4 \
    --val-batches 1 --log-every 2 --out "$TRAIN"
else
  # The compiled kernels and the Triton expert path of the layer (the interpreter is off on a GPU).
  step kernel_tests 180 "$PY" -m pytest -q tests/kernels tests/test_expert_ffn.py tests/test_layer.py -k "not gradcheck"
  step grouped_gemm 120 "$PY" benchmarks/bench_grouped_gemm.py --models v2-lite v3 --experts 8 32 --tokens 128 2048 \
    --dtype bf16 --dists uniform --out "$OUT/grouped_gemm.json"
  step layer 90 "$PY" benchmarks/bench_layer.py --device cuda --ep 1 --dtypes bf16 fp32 --json "$OUT/layer.json"
  # MoEConfig.sync_free: eager, torch.compile(fullgraph=True) and the eager step captured in one CUDA graph
  step sync_free 90 "$PY" benchmarks/bench_sync_free.py --device cuda --cuda-graph --dtype bf16 \
    --modes v2_device_limited_dropping --iters 20 --json "$OUT/sync_free.json"
  step train 60 "$PY" launch/train.py --preset tiny --steps 200 --out "$TRAIN"
fi
cp "$TRAIN/metrics.jsonl" "$OUT/train_metrics.jsonl" 2> /dev/null
"$PY" benchmarks/gpu_summary.py "$OUT" | tee -a "$LOG"
exit $status
