"""How much of the teacher's quality a distilled student recovers.

Prints WikiText-2 test perplexity at a long context (default 2048) of: the teacher, the converted but untrained
student, the window-only baseline with the same window and sinks, and the distilled student, plus the tokens
trained and the share of the window-only gap to the teacher that distillation recovers.

    python benchmarks/recovery.py --student out/quickstart            # a folder made by `rnnify run`
    python benchmarks/recovery.py --student out/mil50 out/mil25       # several students of one teacher
    python benchmarks/recovery.py --recipe quickstart                 # run the recipe first
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

import rnnify  # noqa: F401
from rnnify import sources
from rnnify.cache_size import cache_bytes
from rnnify.convert import convert
from rnnify.eval.perplexity import perplexity, tokenize_text_file, windows
from rnnify.eval.report import window_baseline
from rnnify.units import human_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", nargs="+", help="folder(s) of distilled models (made by rnnify run)")
    ap.add_argument("--recipe", help="run this recipe first (name or file) and use its output")
    ap.add_argument("--text", default="builtin:wikitext-2/test.txt")
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    if args.recipe:
        from rnnify.pipeline.runner import run_recipe
        from rnnify.recipe import load_recipe

        recipe = load_recipe(args.recipe, ["output.overwrite=true"])
        run_recipe(recipe)
        args.student = [recipe.output.dir]
    if not args.student:
        ap.error("give --student or --recipe")
    t0 = time.time()
    teacher = tok = blocks = None
    rows = []
    for folder in map(Path, args.student):
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        conv = recipe["conversion"]
        if teacher is None:
            teacher, _ = sources.load_source(recipe["model"]["source"])
        student, tok = sources.load_source(str(folder))
        if blocks is None:
            blocks = windows(tokenize_text_file(args.text, tok), args.context_length, args.windows)
            rows.append(("teacher", recipe["model"]["source"], perplexity(teacher, blocks)["ppl"], None,
                         cache_bytes(teacher, 4096), cache_bytes(teacher, 32768)))
        untrained = convert(teacher, conv["method"], conv.get("keep_attention"), conv.get("options"),
                            attention_fraction=conv.get("attention_fraction"), attention_every=conv.get("attention_every"))
        baseline, label = window_baseline(student, teacher)
        kept = sum(m == "attention" for m in student.config.layer_mixers)
        name = f"{conv['method']} ({kept}/{len(student.config.layer_mixers)} attention)"
        tokens = _tokens_trained(folder)
        rows.append((name, "untrained", perplexity(untrained, blocks)["ppl"], 0, None, None))
        rows.append((name, label + ", no memory", perplexity(baseline, blocks)["ppl"], None, None, None))
        rows.append((name, "distilled", perplexity(student, blocks)["ppl"], tokens,
                     cache_bytes(student, 4096), cache_bytes(student, 32768)))
    print(f"\nWikiText-2 test perplexity, {blocks.shape[0]} windows of {args.context_length} tokens ({args.text})")
    print(f"{'model':<36} {'variant':<34} {'ppl':>8} {'tokens trained':>15} {'cache@4k':>10} {'cache@32k':>10}")
    for name, variant, ppl, tokens, c4, c32 in rows:
        print(f"{name:<36} {variant:<34} {ppl:>8.2f} {'' if tokens is None else f'{tokens:,}':>15} "
              f"{'' if c4 is None else human_bytes(c4):>10} {'' if c32 is None else human_bytes(c32):>10}")
    t = rows[0][2]
    for k in range(1, len(rows), 3):
        u, b, s = rows[k][2], rows[k + 1][2], rows[k + 2][2]
        msg = f"{rows[k][0]}: distilled {s:.2f} vs untrained {u:.2f}"
        if b > t and s <= b:
            msg += f"; recovers {(b - s) / (b - t):.1%} of the window-only gap ({b:.2f} -> teacher {t:.2f})"
        elif b > t:
            msg += f"; behind the window-only baseline ({b:.2f}; teacher {t:.2f})"
        print(msg)
    print(f"cache sizes: per sequence, bf16 keys/values, fp32 states ({time.time() - t0:.0f}s)")


def _tokens_trained(folder: Path) -> int:
    last = {}
    if (folder / "metrics.jsonl").exists():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            last[r["stage"]] = r["tokens"]
    return sum(last.values())


if __name__ == "__main__":
    main()
