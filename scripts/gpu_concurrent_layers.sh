#!/usr/bin/env bash
# Issue 9 on one GPU: FlatQuant W4A4KV4 (paper settings, embedded model) calibrated with CONCURRENT layers at
# once and, as the baseline of the same machine, one layer at a time; then the two runs' layer checkpoints
# compared (eval.compare_runs; the same method: equal up to the GPU's run-to-run rounding). Writes run
# records (with their phase_seconds), logs and the comparison to $OUT. Needs the staged environment
# (../shared/docs/gpu-machine.md).
#
#   bash scripts/gpu_concurrent_layers.sh CONCURRENT [SECONDS_PER_RUN]
set -u
k=$1; limit=${2:-240}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.csv"
run() {  # NAME CONCURRENT: one calibration (no evaluation) into /root/cl/NAME, its run.json to $OUT
  timeout "$limit" python -m eval.prequantize --profile paper --only-runs flatquant-W4A4KV4-s --jobs-per-gpu 1 \
    --concurrent-layers "$2" --run-root "/root/cl/$1" --reports-dir "/root/cl/$1/reports" > "$OUT/$1.log" 2>&1
  echo "$1: exit $?"; mkdir -p "$OUT/$1"; cp /root/cl/$1/*/run.json "$OUT/$1/" 2>/dev/null
}
run "concurrent$k" "$k"
run single 1
python -m eval.compare_runs "/root/cl/concurrent$k/flatquant-W4A4KV4-s" /root/cl/single/flatquant-W4A4KV4-s \
  --out "$OUT/compare.json" > /dev/null
cat "$OUT/compare.json"
