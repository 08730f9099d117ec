#!/usr/bin/env bash
# Issue 9 on one GPU: the trained paper runs alone under the two trainers of qllm_core.training, in one call.
#   1. the GPU tests of the compiled quantizers (the open fp32 case with --runxfail, so its log says which
#      check fails and by how much) and of the CUDA-graph capture;
#   2. FlatQuant W4A4KV4 and QLLM W4A4 with compiled quantizers (graph+compile), calibrated and evaluated
#      (full-set perplexity), each alone on the GPU;
#   3. FlatQuant W4A4KV4 with CUDA-graph steps only (graph), calibration only, and its layers compared with 2.
# Run records (stats: phase_seconds, trainer), tables, logs and the comparison go to $OUT/ab.tgz (one file: a call
# returns only a few files, and the stop-22 call lost its tables and one run record to that limit).
# Needs the staged environment (../shared/docs/gpu-machine.md).
#
#   bash scripts/gpu_trainer_ab.sh [SECONDS_PER_RUN]
set -u
limit=${1:-200}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
A=/root/ab-out; mkdir -p "$A"
PYTHONPATH=/tmp/site:$PYTHONPATH timeout 150 python -m pytest -q -rxXs tests/test_training.py \
  -k "compiled_quantizer_equals_eager or graph_step_equals or concurrent or cannot_be_captured" \
  > "$A/gpu_tests.log" 2>&1
echo "tests: exit $?"; tail -n 4 "$A/gpu_tests.log"
run() {  # NAME RUN ARGS...: one paper run alone into /root/ab/NAME; run.json, tables and log to $A/NAME
  local name=$1 slug=$2; shift 2
  local start=$SECONDS
  timeout "$limit" python -m eval.prequantize --profile paper --only-runs "$slug" --jobs-per-gpu 1 \
    --run-root "/root/ab/$name" --reports-dir "/root/ab/$name/reports" "$@" > "$A/$name-$slug.log" 2>&1
  echo "$name $slug: exit $? after $((SECONDS - start)) s"; mkdir -p "$A/$name"
  cp /root/ab/$name/$slug/run.json "$A/$name/$slug.json" 2>/dev/null
  cp -r /root/ab/$name/reports/tables "$A/$name/" 2>/dev/null
}
run compile flatquant-W4A4KV4-s --compile-quantizers --evaluate
run compile qllm-W4A4-a --compile-quantizers --evaluate
run graph flatquant-W4A4KV4-s --no-compile-quantizers
python -m eval.compare_runs /root/ab/compile/flatquant-W4A4KV4-s /root/ab/graph/flatquant-W4A4KV4-s \
  --out "$A/compare_flatquant_compile_vs_graph.json" > /dev/null
head -c 1500 "$A/compare_flatquant_compile_vs_graph.json"; echo
cat "$A"/*/tables/perplexity.csv 2>/dev/null
tar -C /root -czf "$OUT/ab.tgz" ab-out
