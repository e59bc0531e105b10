"""The memory plan (``rnnify validate --plan``) against the memory a run really takes, on CPU.

Each case runs ``rnnify run`` on a short recipe in its own process, sampling its anonymous resident set every 5 ms
(glibc's mmap threshold fixed, so freed tensors leave it); the measurement is the peak less the resident set just
before the run (libraries imported, nothing loaded). The plan
for the same recipe on one process, without the GPU-only overhead, is printed beside it with the ratio.

    python benchmarks/memory_plan.py                      # SmolLM2-135M: distill and full finetune stages
    python benchmarks/memory_plan.py --source path/to/model --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = {
    "distill (supra, new parameters train)": ("supra", {"type": "distill", "lr": 1e-3}),
    "attention_transfer (lolcats)": ("lolcats", {"type": "attention_transfer", "lr": 1e-2}),
    "finetune (supra, every parameter trains)": ("supra", {"type": "finetune", "lr": 1e-5, "trainable": ["*"]}),
}


def recipe_dict(source, method, stage, seq_len, batch, out):
    return {"name": "memory-check", "model": {"source": source, "dtype": "float32"},
            "conversion": {"method": method, "options": {"window": 64, "sinks": 4} if method == "lolcats" else {}},
            "datasets": {"wiki": {"path": "builtin:wikitext-2/valid.txt"}},
            "stages": [{**stage, "max_steps": 2, "seq_len": seq_len, "batch_size": batch}],
            "output": {"dir": str(out)}}


def child(path: str):
    from data import PeakRSS  # benchmarks/data.py

    from rnnify.pipeline.runner import run_recipe
    from rnnify.recipe import load_recipe

    recipe = load_recipe(path, [])
    with PeakRSS() as rss:
        run_recipe(recipe, progress=False)
    print(json.dumps({"measured": rss.above * 2**20}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    import yaml

    from rnnify.pipeline.memory_plan import fmt, plan_recipe
    from rnnify.recipe import load_recipe

    print(f"{args.source}, {args.batch} x {args.seq_len} tokens per step, float32, one process on CPU\n")
    print(f"{'stage':<44} {'plan':>11} {'measured':>11} {'plan/measured':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (method, stage) in CASES.items():
            path = Path(tmp) / f"{method}-{stage['type']}.yaml"
            path.write_text(yaml.safe_dump(recipe_dict(args.source, method, stage, args.seq_len, args.batch,
                                                       Path(tmp) / f"out-{method}-{stage['type']}")))
            plan = plan_recipe(load_recipe(str(path), []), devices=1, cuda=False).stages[0]
            # glibc's mmap threshold fixed: a freed tensor leaves the resident set (else its heap may keep it)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            r = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                               env=env)
            if r.returncode:
                print(f"{label:<44} failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            measured = json.loads(r.stdout.strip().splitlines()[-1])["measured"]
            print(f"{label:<44} {fmt(plan.total):>11} {fmt(measured):>11} {plan.total / measured:>14.2f}")
            parts = ", ".join(f"{k} {fmt(v)}" for k, v in plan.parts.items())
            print(f"{'':<4}plan: {parts}, activations {fmt(plan.activation_bytes)}")


if __name__ == "__main__":
    main()
