#!/usr/bin/env bash
# The paper-profile GPU work of issues 9-12 on a 4-GPU machine, in calls of at most ~10 minutes.
#
#   bash scripts/gpu_session.sh SECONDS JOB [JOB ...]
#
# Each JOB is "GPUS:NAME" and runs one of the commands below pinned to those GPUs, in the background;
# after SECONDS (or when every job has ended) whatever still runs is stopped and everything written
# so far is copied to $OUT. Results accumulate in /root/results between calls of one warm machine and
# runs in /root/runs (interrupted calibrations resume from their per-layer checkpoints), so a later
# call repeats a job with --missing-only semantics and loses at most the layer in flight.
# Needs the staged environment (../shared/docs/gpu-machine.md): source /root/qllm-stage/env.sh first.
set -u
DEADLINE=$1; shift
R=/root/results; mkdir -p "$R"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$R/gpus.csv"

job() {  # the command of one job name
  case "$1" in
    grid)   # every paper run (26 + FP): calibration, perplexity on the full test sets, zero-shot full sets
      echo "python -m eval.prequantize --profile paper --grid all --jobs-per-gpu 2 --evaluate --zeroshot \
            --zeroshot-batch-size 64 --missing-only --run-root /root/runs --reports-dir $R/grid" ;;
    alone)  # FlatQuant W4A4KV4 and QLLM W4A4, one run on the GPU at a time (issue 9's targets)
      echo "python -m eval.prequantize --profile paper --grid core --only-methods flatquant qllm --jobs-per-gpu 1 \
            --evaluate --missing-only --run-root /root/runs-alone --reports-dir $R/alone" ;;
    speed)  # issue 12: the layer and whole-model benchmarks (ratios vs bf16 in the same run)
      echo "python -m eval.speedup --quick --reports-dir $R/speed" ;;
    cost)   # issue 11: LLaMA-shaped calibration cost
      echo "python -m eval.calibration_cost --profile paper --device cuda --table $R/cost/calibration_cost.csv" ;;
    tests)  # every GPU test of the suite
      echo "python -m pytest -q -rs tests/kernels tests/test_training.py tests/test_flatquant.py" ;;
    *) echo "unknown job $1" >&2; return 1 ;;
  esac
}

pids=()
for spec in "$@"; do
  gpus=${spec%%:*}; name=${spec#*:}
  cmd=$(job "$name") || exit 2
  (cd "$PWD" && CUDA_VISIBLE_DEVICES=$gpus setsid bash -c "$cmd" >> "$R/$name.log" 2>&1; echo "exit $?" >> "$R/$name.log") &
  pids+=($!)
  echo "started $name on GPU(s) $gpus"
done
end=$((SECONDS + DEADLINE))
while [ $SECONDS -lt $end ] && [ -n "$(jobs -rp)" ]; do sleep 5; done
pkill -TERM -f "eval\.(prequantize|speedup|calibration_cost)|multiprocessing\.spawn|pytest" 2>/dev/null
sleep 3
pkill -KILL -f "eval\.(prequantize|speedup|calibration_cost)|multiprocessing\.spawn|pytest" 2>/dev/null
tar -C /root -czf "$OUT/results.tgz" results
ls -la "$R"; tail -n 5 "$R"/*.log
