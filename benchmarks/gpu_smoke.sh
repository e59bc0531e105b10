#!/usr/bin/env bash
# The GPU smoke recipe and the kernel checks in one go, for a session lent a GPU (see the device tool):
#   bash benchmarks/gpu_smoke.sh [SOURCE]      # SOURCE: a model folder if smollm2-135m's GGUF is not installed
# Prints the kernel checks (benchmarks/gpu_check.sh), then `rnnify run gpu_smoke` with RNNIFY_KERNELS=triton,
# and tokens/s per stage from the run's metrics.jsonl. Logs go to $OUT (or ./gpu_out).
# The run needs rnnify's dependencies (pip install -e .); where the machine has no package registry, the kernel
# checks still run and the recipe step says which module is missing.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 580 bash benchmarks/gpu_check.sh
source_override=()
if [ $# -ge 1 ]; then source_override=("model.source=$1"); fi
echo "== recipe gpu_smoke (RNNIFY_KERNELS=triton)"
python3 -c "import accelerate, datasets, pydantic, safetensors" 2>"$out/missing.log" \
  || { echo "   cannot run the recipe here: $(tail -n 1 "$out/missing.log")"; exit 1; }
rm -rf out/gpu_smoke out/gpu_smoke.run
RNNIFY_KERNELS=triton timeout 1800 python3 -u -m rnnify run gpu_smoke "${source_override[@]}" --no-progress \
  >"$out/gpu_smoke.log" 2>&1
echo "   exit $? -> $out/gpu_smoke.log"; tail -n 30 "$out/gpu_smoke.log"
python3 benchmarks/stage_summary.py out/gpu_smoke.run/metrics.jsonl
