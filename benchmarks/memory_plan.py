"""The memory plan (``rnnify validate --plan``) against the memory a run really takes, on CPU.

Each case runs ``rnnify run`` on a short recipe in its own process, sampling its anonymous resident set every 5 ms
(glibc's mmap threshold fixed, so freed tensors leave it), and the same with the file pages it maps (weights read from
a safetensors file stay mapped; on a GPU they would be copied); the measurement is the peak less the resident set just
before the run (libraries imported, nothing loaded). The plan
for the same recipe on one process, without the GPU-only overhead, is printed beside it with the ratio.

    python benchmarks/memory_plan.py                      # SmolLM2-135M: every case below, 4 x 512 tokens
    python benchmarks/memory_plan.py --seq-len 2048 --batch 1 --only distill
    python benchmarks/memory_plan.py --source path/to/model --seq-len 256

Cases come in pairs with a baseline in the same run: the losses over whole logits against the same stage in chunks
of ``logits_chunk`` positions (distill/logits.py), attention transfer with every layer's graph at once against
``layers_per_block`` 5 and 1.
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
    "distill (supra), whole logits": ("supra", {"type": "distill", "lr": 1e-3, "logits_chunk": None}),
    "distill (supra), logits_chunk 128": ("supra", {"type": "distill", "lr": 1e-3, "logits_chunk": 128}),
    "distill (lolcats), whole logits": ("lolcats", {"type": "distill", "lr": 1e-3, "logits_chunk": None}),
    "distill (lolcats), logits_chunk 128": ("lolcats", {"type": "distill", "lr": 1e-3, "logits_chunk": 128}),
    "distill (lolcats), logits_chunk 128 + gradient checkpointing": (
        "lolcats", {"type": "distill", "lr": 1e-3, "logits_chunk": 128, "gradient_checkpointing": True}),
    "attention_transfer (lolcats), all layers": ("lolcats", {"type": "attention_transfer", "lr": 1e-2}),
    "attention_transfer (lolcats), 5 per block": ("lolcats", {"type": "attention_transfer", "lr": 1e-2,
                                                              "layers_per_block": 5}),
    "attention_transfer (lolcats), 1 per block": ("lolcats", {"type": "attention_transfer", "lr": 1e-2,
                                                              "layers_per_block": 1}),
    "finetune (supra, all train), whole logits": ("supra", {"type": "finetune", "lr": 1e-5, "trainable": ["*"],
                                                            "logits_chunk": None}),
    "finetune (supra, all train), logits_chunk 128": ("supra", {"type": "finetune", "lr": 1e-5, "trainable": ["*"],
                                                                "logits_chunk": 128}),
}


def recipe_dict(source, method, stage, seq_len, batch, out, steps=2):
    return {"name": "memory-check", "model": {"source": source, "dtype": "float32"},
            "conversion": {"method": method, "options": {"window": 64, "sinks": 4} if method == "lolcats" else {}},
            "datasets": {"wiki": {"path": "builtin:wikitext-2/valid.txt"}},
            "stages": [{**stage, "max_steps": steps, "seq_len": seq_len, "batch_size": batch}],
            "output": {"dir": str(out)}}


def child(path: str):
    from data import PeakRSS  # benchmarks/data.py

    from rnnify.pipeline.runner import run_recipe
    from rnnify.recipe import load_recipe

    recipe = load_recipe(path, [])
    with PeakRSS() as rss, PeakRSS(("RssAnon", "RssFile")) as mapped:
        run_recipe(recipe, progress=False)
    metrics = Path(str(recipe.output.dir) + ".run") / "metrics.jsonl"
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    print(json.dumps({"measured": rss.above * 2**20, "mapped": mapped.above * 2**20, "losses": losses}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", default="", help="run the cases whose label contains this text")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    import yaml

    from rnnify.pipeline.memory_plan import fmt, plan_recipe
    from rnnify.recipe import load_recipe

    print(f"{args.source}, {args.batch} x {args.seq_len} tokens per step, float32, one process on CPU\n")
    print("measured: the peak anonymous resident set of the run; + mapped: with the file pages it maps (weights read "
          "from a safetensors file stay mapped, not copied)\n")
    print(f"{'stage':<62} {'plan':>11} {'measured':>11} {'+ mapped':>11} {'plan/(+ mapped)':>16} "
          f"{'measured/first':>15} {'max |loss - first|':>19}")
    first = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (method, stage) in CASES.items():
            if args.only not in label:
                continue
            key = "-".join(label.replace(",", "").replace("(", "").replace(")", "").split())
            path = Path(tmp) / f"{key}.yaml"
            path.write_text(yaml.safe_dump(recipe_dict(args.source, method, stage, args.seq_len, args.batch,
                                                       Path(tmp) / f"out-{key}", args.steps)))
            plan = plan_recipe(load_recipe(str(path), []), devices=1, cuda=False).stages[0]
            # glibc's mmap threshold fixed: a freed tensor leaves the resident set (else its heap may keep it)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            r = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                               env=env)
            if r.returncode:
                print(f"{label:<62} failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            result = json.loads(r.stdout.strip().splitlines()[-1])
            measured = result["measured"]
            group = label.split(",")[0]  # the cases of one stage and method: the first is the baseline
            base, base_losses = first.setdefault(group, (measured, result["losses"]))
            diff = max(abs(a - b) for a, b in zip(result["losses"], base_losses))
            mapped = result["mapped"]
            print(f"{label:<62} {fmt(plan.total):>11} {fmt(measured):>11} {fmt(mapped):>11} "
                  f"{plan.total / mapped:>16.2f} {measured / base:>15.2f} {diff:>19.2e}")
            parts = ", ".join(f"{k} {fmt(v)}" for k, v in plan.parts.items())
            print(f"{'':<4}plan: {parts}, activations {fmt(plan.activation_bytes)}")


if __name__ == "__main__":
    main()
