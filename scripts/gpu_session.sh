#!/usr/bin/env bash
# The paper-profile GPU work of issues 9-12 on a machine of one or more GPUs, in calls of at most ~10 minutes.
#
#   bash scripts/gpu_session.sh SECONDS JOB [JOB ...]
#
# Each JOB is "GPUS:NAME[+NAME...]": the commands below, one after the other, pinned to those GPUs, in the background;
# after SECONDS (or when every job has ended) whatever still runs is stopped and everything written
# so far is copied to $OUT. Results accumulate in /root/results between calls of one warm machine and
# runs in /root/runs (interrupted calibrations resume from their per-layer checkpoints), so a later
# call repeats a job with --missing-only semantics and loses at most the layer in flight; evaluation rows
# reach the tables after a run's perplexities and after each zero-shot task, and the runs' records and evaluation caches
# (run.json, eval/*.json) are copied to $OUT too, so nothing measured is lost with the machine.
# The JOBs share the host's CPU cores equally (taskset): each prequantize worker sizes its torch threads
# from its share (more threads than cores starved every job's host side on a 32-core H200 host).
# RUN_ROOT (default /root/runs): where the paper-profile jobs make their runs (a timing that must not reuse runs made
# by an earlier job, such as the grid's after an alone run, gets its own).
# MPS=1: the call's jobs share the GPU through a CUDA MPS control daemon of their own (private pipe and log
# directories, quit at the end of the call; nothing of the GPU's settings changes), so the processes of a grid run
# their kernels side by side instead of time-slicing the GPU; if the daemon does not start or a CUDA client cannot
# reach it within a minute, the call goes on without it. "mps on" / "mps unavailable" is written to mps.log.
# Needs the staged environment (../shared/docs/gpu-machine.md): source /root/qllm-stage/env.sh first.
set -u
DEADLINE=$1; shift
R=/root/results; mkdir -p "$R"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$R/gpus.csv"

paper_runs() {  # REPORTS_NAME ARGS...: paper-profile runs missing from $R/REPORTS_NAME's tables, made and evaluated
              # in the one run root (a run made by one job is only evaluated by another, not made again)
  local name=$1; shift
  echo "python -m eval.prequantize --profile paper --grid all --evaluate --missing-only --run-root ${RUN_ROOT:-/root/runs} \
        --reports-dir $R/$name $*"
}

job() {  # the command of one job name
  case "$1" in
    grid)   # every paper run (26 + FP) whose rows the repo's tables lack: calibration, perplexity on the
            # full test sets, zero-shot full sets (the tables are seeded from reports/ once per machine)
      [ -d "$R/grid/tables" ] || { mkdir -p "$R/grid/tables" && cp reports/tables/{perplexity,zeroshot}.csv "$R/grid/tables/"; }
      paper_runs grid --jobs-per-gpu "${GRID_JOBS:-2}" --zeroshot --zeroshot-batch-size 64 "${GRID_ARGS:-}" ;;
    paper)  # issue 9's grid timing: every paper run (26 + FP) calibrated and evaluated (full-set perplexity, no
            # zero-shot) into fresh tables, GRID_JOBS at once; a later call goes on with what is missing
      paper_runs paper --jobs-per-gpu "${GRID_JOBS:-4}" ${GRID_ARGS:-} ;;
    fp)     # FP's rows alone first (full-set perplexity + zero-shot): the reference of both papers' averages
      paper_runs fp --only-runs fp-W16A16-s --zeroshot --zeroshot-batch-size 64 ;;
    alone)  # trained runs of the paper grid, one run on the GPU at a time (issue 9)
      paper_runs alone --only-runs "${ALONE_RUNS:-flatquant-W4A4KV4-s qllm-W4A4-a}" --jobs-per-gpu 1 ;;
    profile)  # issues 9/11: wall vs device time per training step (CUDA graphs, the methods' autocast); PROFILE_ARGS
              # picks cases / modes / shape (e.g. "--cases qllm-ec --modes graph --shape llama2-70b --nsamples 16")
      echo "python eval/profile_calibration.py --label new ${PROFILE_ARGS:---modes graph graph+compile --cases flatquant qllm omniquant} \
            --out $R/profile/calib_profile_graph.json" ;;
    cayley)  # issue 9: the Cayley solves of a FlatQuant step under torch's LU, cuSOLVER and MAGMA (seconds)
      echo "python scripts/bench_cayley_lu.py $R/cayley/cayley_lu.json" ;;
    speed)  # issue 12: layer + whole-model benchmarks, merged into the repo's speedup tables, then kept
      echo "QLLM_BENCH_JSONL=$R/speed/speedup_issue12.jsonl python -m eval.speedup --out reports --merge \
            --phases layers model --shapes llama2-7b --decode-batches 1 16 --kv-lens 512 4096 \
            && cp reports/tables/speedup* reports/figures/speedup* $R/speed/" ;;
    gemv)  # issue 12: decode GEMV rows (tensor-core tiles, the CUDA-core w4_gemv, bf16), merged like speed
      echo "QLLM_BENCH_JSONL=$R/gemv/speedup_gemv.jsonl python -m eval.speedup --out reports --merge \
            --phases gemv --shapes llama2-7b && cp reports/tables/speedup* $R/gemv/" ;;
    cost7)  # issue 11: LLaMA-2-7B / LLaMA-3-8B shapes, FlatQuant and QLLM (COST7_SHAPES, COST7_METHODS: subsets)
      echo "python -m eval.calibration_cost --profile paper --device cuda --methods ${COST7_METHODS:-flatquant qllm} \
            --shapes ${COST7_SHAPES:-llama2-7b llama3-8b} --table $R/cost/calibration_cost.csv" ;;
    cost70f|cost70f2|cost70fc)  # issue 11: FlatQuant on LLaMA-3-70B (cost70f; cost70fc: with compiled quantizers) /
              # LLaMA-2-70B (cost70f2) shapes, 2 layers at COST70F_EPOCHS of the 15 epochs (projected to 15: a 70B
              # layer took ~200 s eagerly at 15 epochs); COST70_ARGS: more options of every 70B job (e.g. --tf32)
      local shape=llama3-70b extra=; [ "$1" = cost70f2 ] && shape=llama2-70b; [ "$1" = cost70fc ] && extra=--compile-quantizers
      echo "python -m eval.calibration_cost --profile paper --device cuda --methods flatquant \
            --shapes $shape --layers 2 --epochs ${COST70F_EPOCHS:-5} $extra ${COST70_ARGS:-} --table $R/cost/calibration_cost_$1.csv" ;;
    cost70q|cost70qc)  # issue 11: QLLM on LLaMA-2-70B, one 4-layer error-correction group (8 layers, the default, took
              # ~60 s per layer's search + ~80 s per group-epoch on an H200: longer than one call; COST70Q_LAYERS, default 4); cost70qc: compiled quantizers
      local extra=; [ "$1" = cost70qc ] && extra=--compile-quantizers
      echo "python -m eval.calibration_cost --profile paper --device cuda --methods qllm --shapes llama2-70b \
            --layers ${COST70Q_LAYERS:-4} $extra ${COST70_ARGS:-} --table $R/cost/calibration_cost_$1.csv" ;;
    costref)  # issue 11: GPTQ / QuaRot for reference (COSTREF_SHAPES: a subset)
      echo "python -m eval.calibration_cost --profile paper --device cuda --methods gptq quarot \
            --shapes ${COSTREF_SHAPES:-llama2-7b llama3-8b llama2-70b} --table $R/cost/calibration_cost_ref.csv" ;;
    tests)  # the GPU tests of the suite (pytest travels as wheels in .whl)
      echo "python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:\$PYTHONPATH \
            python -m pytest -q -rs ${PYTEST_ARGS:-tests/kernels tests/test_training.py tests/test_flatquant.py}" ;;
    *) echo "unknown job $1" >&2; return 1 ;;
  esac
}

mps_start() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/qllm-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/qllm-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 60 python -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    echo "mps on $(date -u +%FT%TZ)" >> "$R/mps.log"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "mps unavailable $(date -u +%FT%TZ)" >> "$R/mps.log"
  fi
}
[ "${MPS:-0}" = 1 ] && mps_start

pids=()
cores=$(nproc); share=$(( cores / $# > 0 ? cores / $# : 1 )); first=0
for spec in "$@"; do  # GPUS:NAME[+NAME...]: the names run one after the other on those GPUs
  gpus=${spec%%:*}; names=${spec#*:}
  cpus="$first-$(( first + share - 1 < cores ? first + share - 1 : cores - 1 ))"
  first=$(( first + share < cores ? first + share : 0 ))
  cmds=()
  for name in ${names//+/ }; do
    cmd=$(job "$name") || exit 2
    mkdir -p "$R/$name"
    cmds+=("echo \"start \$(date -u +%FT%TZ)\" >> $R/$name.log; { $cmd; } >> $R/$name.log 2>&1; \
            echo \"exit \$? \$(date -u +%FT%TZ)\" >> $R/$name.log")
  done
  (IFS=';'; CUDA_VISIBLE_DEVICES=$gpus OMP_NUM_THREADS=$share setsid taskset -c "$cpus" bash -c "${cmds[*]}") &
  pids+=($!)
  echo "started $names on GPU(s) $gpus, CPU cores $cpus"
done
end=$((SECONDS + DEADLINE))
while [ $SECONDS -lt $end ] && [ -n "$(jobs -rp)" ]; do sleep 5; done
stop="eval[./](prequantize|speedup|calibration_cost|profile_calibration)|bench_cayley_lu|multiprocessing\.spawn|pytest"
pkill -TERM -f "$stop" 2>/dev/null; sleep 3; pkill -KILL -f "$stop" 2>/dev/null
if [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]; then
  echo quit | nvidia-cuda-mps-control; cp -r "$CUDA_MPS_LOG_DIRECTORY" "$R/mps-log" 2>/dev/null
fi
ls -d /root/runs* >/dev/null 2>&1 && (cd /root && find runs* -name '*.json' -size -1024k | tar -czf "$R/runs-meta.tgz" -T -)
tar -C /root -czf "$OUT/results.tgz" results
ls -la "$R"; tail -n 5 "$R"/*.log
