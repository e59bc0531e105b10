"""How much of the teacher's quality a distilled student recovers.

Prints WikiText-2 test perplexity at a long context (default 2048) of: the teacher, the converted but untrained
student, the window-only baseline with the same window and sinks, and the distilled student, plus the tokens
trained and the share of the window-only gap to the teacher that distillation recovers.

    python benchmarks/recovery.py --student out/quickstart            # a folder made by `rnnify run`
    python benchmarks/recovery.py --recipe quickstart                 # run the recipe first
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

import rnnify  # noqa: F401
from rnnify import models
from rnnify.convert import convert
from rnnify.distill.data import tokenize_text_file
from rnnify.eval.perplexity import perplexity, windows
from rnnify.eval.report import window_baseline


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="folder of a distilled model (made by rnnify run)")
    ap.add_argument("--recipe", help="run this recipe first (name or file) and use its output")
    ap.add_argument("--text", default="builtin:wikitext-2/test.txt")
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    if args.recipe:
        from rnnify.distill.runner import run_recipe
        from rnnify.recipe import load_recipe

        recipe = load_recipe(args.recipe, ["output.overwrite=true"])
        run_recipe(recipe)
        args.student = recipe.output.dir
    if not args.student:
        ap.error("give --student or --recipe")
    folder = Path(args.student)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    conv = recipe["conversion"]
    t0 = time.time()
    student, tok = models.load_source(str(folder))
    teacher, _ = models.load_source(recipe["model"]["source"])
    untrained = convert(teacher, conv["method"], conv.get("keep_attention"), conv.get("options"))
    baseline, label = window_baseline(student, teacher)
    blocks = windows(tokenize_text_file(args.text, tok), args.context_length, args.windows)
    ppl = {}
    for name, m in [("teacher", teacher), ("converted, untrained", untrained), (label + " (no memory)", baseline),
                    ("distilled student", student)]:
        ppl[name] = perplexity(m, blocks)["ppl"]
    tokens = 0
    if (folder / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        last = {}
        for r in rows:
            last[r["stage"]] = r["tokens"]
        tokens = sum(last.values())
    print(f"\nWikiText-2 test perplexity, {blocks.shape[0]} windows of {args.context_length} tokens "
          f"({args.text}); method {conv['method']} {conv.get('options', {})}")
    print(f"{'model':<40} {'ppl':>8}")
    for k, v in ppl.items():
        print(f"{k:<40} {v:>8.2f}")
    t, b, s = ppl["teacher"], ppl[label + " (no memory)"], ppl["distilled student"]
    print(f"tokens trained: {tokens:,}")
    if b > t:
        print(f"window-only gap to the teacher recovered by the student: {(b - s) / (b - t):.1%}")
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
