#!/usr/bin/env bash
# Every GPU check of the kernels issue in one run, for a session lent a device machine (see the device tool):
#   bash benchmarks/gpu_check.sh            # writes logs to $OUT (or ./gpu_out)
# The device image has torch, triton and transformers but no package registry: rnnify runs from the tree
# (PYTHONPATH), nothing is installed. The step timeouts add up to 570 s, under the 600 s a device command gets.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="python3 -u"  # unbuffered: a step cut off by its timeout keeps what it printed
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s): $*"
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  echo "   exit $? -> $out/$name.log"; tail -n 40 "$out/$name.log"
}
step versions 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $py -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())'"
# correctness, compiled (not interpreted): the same tests CI runs in the interpreter
step tests 120 $py -m pytest -q -x -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_reference.py
step kernels 180 $py benchmarks/kernel_speed.py
step decode 240 $py benchmarks/decode.py --cuda-graph --new-tokens 32
