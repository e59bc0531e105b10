"""benchmarks/gpu_proof.sh, the prepared device run, in its CPU dry run: every step it will take on the GPU (kernel
timings, the recipe with its evaluation, decoding, the kernel tests) on tiny shapes with the reference kernels, so
the script cannot rot between device sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_proof_script_runs_every_step_in_its_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RNNIFY_PROOF_STASH": str(tmp_path / "stash"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 is this interpreter
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "--dry-run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "gpu_proof: every step passed" in r.stdout
    out = tmp_path / "out"
    kernels = (out / "kernels.log").read_text()
    assert "fwd+bwd ms" in kernels and "chunk_linear_attention" in kernels and "chunk_delta_rule" in kernels
    rows = [json.loads(x) for x in (out / "gpu_smoke" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["attention_transfer"] * 5 + ["distill"] * 5
    report = json.loads((out / "gpu_smoke" / "eval.json").read_text())
    assert "wikitext-2/test.txt" in json.dumps(report)
    decode = (out / "decode.log").read_text()
    assert all(f"rnnify {m}" in decode for m in ("supra", "lolcats", "gated_deltanet"))
    assert " passed" in (out / "tests.log").read_text()


def test_the_gpu_proof_script_says_how_it_is_used():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: bash benchmarks/gpu_proof.sh prepare | receive | run | --dry-run" in r.stdout
