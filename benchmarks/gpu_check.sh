#!/usr/bin/env bash
# Every GPU check of the kernels issue in one run, for a session lent a device machine (see the device tool):
#   bash benchmarks/gpu_check.sh            # writes logs to $OUT (or ./gpu_out)
# The device image has torch, triton and transformers but no package registry: rnnify runs from the tree
# (PYTHONPATH). What the image lacks (pydantic; a transformers as new as rnnify's floor) travels as wheels: run
# `bash benchmarks/gpu_wheels.sh` here first and carry ".whl"; they are installed under /tmp, nothing else is.
# The step timeouts add up to 570 s, under the 600 s a device command gets.
# Measured on an H200 (2026-11-30): compiling the kernels dominates a cold run. One pytest process compiled 40 tests'
# kernels in 150 s, so the tests run on 8 workers where pytest-xdist is there. flash-linear-attention's autotuning
# costs minutes more when it is installed, and fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1
# (kernel_speed.py then prints that row as not run and goes on).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (benchmarks/gpu_wheels.sh): what the image lacks or has too old
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rnnify-site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/rnnify-site${PYTHONPATH:+:$PYTHONPATH}"
fi
py="python3 -u"  # unbuffered: a step cut off by its timeout keeps what it printed
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s): $*"
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  echo "   exit $? -> $out/$name.log"; tail -n 40 "$out/$name.log"
}
step versions 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $py -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())'"
# correctness, compiled (not interpreted): the same tests CI runs in the interpreter
workers=(); $py -c "import xdist" 2>/dev/null && workers=(-n 8)
step tests 200 $py -m pytest -q -p no:cacheprovider "${workers[@]}" tests/test_kernels_triton.py tests/test_kernels_reference.py
step kernels 150 $py benchmarks/kernel_speed.py
step decode 200 $py benchmarks/decode.py --cuda-graph --new-tokens 32
