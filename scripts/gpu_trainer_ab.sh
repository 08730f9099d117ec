#!/usr/bin/env bash
# Issue 9 on one GPU: the trained paper runs alone under the two trainers of qllm_core.training, in one call.
#   1. the GPU tests of the compiled quantizers (the open fp32 case with --runxfail, so its log says which
#      check fails and by how much) and of the CUDA-graph capture;
#   2. FlatQuant W4A4KV4 and QLLM W4A4 with compiled quantizers (graph+compile), calibrated and evaluated
#      (full-set perplexity), each alone on the GPU;
#   3. FlatQuant W4A4KV4 with CUDA-graph steps only (graph), calibration only, and its layers compared with 2.
# Run records (stats: phase_seconds, trainer), tables, logs and the comparison go to $OUT.
# Needs the staged environment (../shared/docs/gpu-machine.md).
#
#   bash scripts/gpu_trainer_ab.sh [SECONDS_PER_RUN]
set -u
limit=${1:-200}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.csv"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
PYTHONPATH=/tmp/site:$PYTHONPATH timeout 150 python -m pytest -q -rxXs --runxfail tests/test_training.py \
  -k "compiled_quantizer_equals_eager and float32 or graph_step_equals or concurrent or cannot_be_captured" \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests: exit $?"; tail -n 4 "$OUT/gpu_tests.log"
run() {  # NAME RUN ARGS...: one paper run alone into /root/ab/NAME; run.json, tables and log to $OUT/NAME
  local name=$1 slug=$2; shift 2
  local start=$SECONDS
  timeout "$limit" python -m eval.prequantize --profile paper --only-runs "$slug" --jobs-per-gpu 1 \
    --run-root "/root/ab/$name" --reports-dir "/root/ab/$name/reports" "$@" > "$OUT/$name.log" 2>&1
  echo "$name $slug: exit $? after $((SECONDS - start)) s"; mkdir -p "$OUT/$name"
  cp /root/ab/$name/$slug/run.json "$OUT/$name/$slug.json" 2>/dev/null
  cp -r /root/ab/$name/reports/tables "$OUT/$name/" 2>/dev/null
}
run compile flatquant-W4A4KV4-s --compile-quantizers --evaluate
run compile qllm-W4A4-a --compile-quantizers --evaluate
run graph flatquant-W4A4KV4-s --no-compile-quantizers
python -m eval.compare_runs /root/ab/compile/flatquant-W4A4KV4-s /root/ab/graph/flatquant-W4A4KV4-s \
  --out "$OUT/compare_flatquant_compile_vs_graph.json" > /dev/null
head -c 1500 "$OUT/compare_flatquant_compile_vs_graph.json"; echo
grep -h "ppl\|took\|runs to make" "$OUT"/*.log | tail -n 12
