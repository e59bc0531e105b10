#!/usr/bin/env bash
# Wheels the device machine's image lacks, downloaded here into .whl/ and .whl-arrow/ (git-ignored) for gpu_check.sh
# and gpu_proof.sh to install there.
#   bash benchmarks/gpu_wheels.sh        # then: device run `bash benchmarks/gpu_check.sh` with carry [".whl"]
# Seen on the H200 image (2026-11-30): python 3.12, torch 2.11, triton 3.6, transformers 5.17 (below rnnify's floor,
# rnnify/modeling/generation_cache.py), no pydantic. The versions are this machine's, so both run the same code.
# flash-linear-attention is left out: 0.6 refuses its gated backward on Hopper with Triton < 3.7.1, and its
# autotuning costs minutes of device time.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=()
for p in transformers pydantic pydantic_core annotated-types typing-inspection typing_extensions \
    accelerate psutil gguf datasets dill multiprocess xxhash fsspec pandas; do  # the last line: what `rnnify run` needs
  pkgs+=("$p==$(ver "$p")")
done
get() {  # get DIR PKG...
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$1" "${@:2}"
}
get .whl "${pkgs[@]}"
# pyarrow alone is about 40 MB: its own folder, so each device call stays under 64 MiB (gpu_proof.sh carries it apart)
grep -qx '/.whl-arrow/' .git/info/exclude 2>/dev/null || echo '/.whl-arrow/' >> .git/info/exclude
get .whl-arrow "pyarrow==$(ver pyarrow)"
du -sh .whl .whl-arrow
