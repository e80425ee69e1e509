# Sourced by the run scripts (distill_runs.sh, upcycle_runs.sh): run OUT SCRIPT ARGS... trains with
# launch/SCRIPT under torchrun on 2 processes, with the caller's COMMON flags, output in OUT; records the wall
# seconds and the load before it. A run whose folder already has wall_seconds (it finished) is kept, so an
# interrupted script can be restarted. Needs PY (the interpreter) and COMMON (an array) set by the caller.
run() {
  local out=$1 script=$2
  shift 2
  if [ -f "$out/wall_seconds" ]; then echo "kept $out"; return; fi
  mkdir -p "$out"
  cut -d' ' -f1-3 /proc/loadavg > "$out/loadavg_before"
  local start=$SECONDS
  timeout 3600 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "launch/$script" "$@" \
    "${COMMON[@]}" --out "$out" > "$out/log.txt" 2>&1
  echo $((SECONDS - start)) > "$out/wall_seconds"
  tail -n 3 "$out/log.txt"
}
