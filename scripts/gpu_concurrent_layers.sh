#!/usr/bin/env bash
# Issue 9 on one GPU: FlatQuant W4A4KV4 (paper settings, embedded model) calibrated with CONCURRENT layers at
# once and, as the baseline of the same machine, one layer at a time; then the two runs' layer checkpoints
# compared (the same method: equal to the GPU's run-to-run rounding). Writes run records, logs and the
# comparison to $OUT. Needs the staged environment (../shared/docs/gpu-machine.md).
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
python - "$k" > "$OUT/compare.json" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
k = sys.argv[1]
a_dir, b_dir = Path(f"/root/cl/concurrent{k}/flatquant-W4A4KV4-s"), Path("/root/cl/single/flatquant-W4A4KV4-s")
worst, differing, layers = 0.0, 0, 0
for path in sorted((a_dir / "layers").glob("*.safetensors")):
    other = b_dir / "layers" / path.name
    if not other.is_file():
        continue
    a, b = load_file(str(path)), load_file(str(other))
    layers += 1
    for name in a:
        diff = (a[name].double() - b[name].double()).abs().max().item()
        scale = b[name].double().abs().max().item() or 1.0
        worst = max(worst, diff / scale)
        differing += diff > 0
stats = {name: json.loads((d / "run.json").read_text()).get("stats") for name, d in (("concurrent", a_dir), ("single", b_dir))
         if (d / "run.json").is_file()}
print(json.dumps({"layers_compared": layers, "tensors_differing": int(differing), "max_rel_diff": worst, "stats": stats}, indent=1))
PY
cat "$OUT/compare.json" | head -40
