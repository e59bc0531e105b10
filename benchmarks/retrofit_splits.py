"""Which prelude / block / coda split to retrofit: perplexity of the untrained surgery for several splits.

With the passthrough adapter ([0 | I]) one loop is exactly the source without the dropped layers, so the untrained
perplexity says how much of the source each split keeps before any training (the looped model starts from it).

    python benchmarks/retrofit_splits.py                                   # SmolLM2-135M, a few splits + the default
    python benchmarks/retrofit_splits.py --splits 0-3/18-25/26-29 0-5/16-23/24-29
"""

from __future__ import annotations

import argparse
import time

import rnnify  # noqa: F401
from rnnify import sources
from rnnify.convert import convert
from rnnify.convert.retrofit import default_split
from rnnify.eval.flops import flops_per_token
from rnnify.eval.perplexity import perplexity, tokenize_text_file, windows


def span(layers):
    return f"{layers[0]}-{layers[-1]}" if layers else "none"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--splits", nargs="*", default=None, help="prelude/block/coda, e.g. 0-3/18-25/26-29")
    ap.add_argument("--text", default="builtin:wikitext-2/test.txt")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    teacher, tok = sources.load_source(args.source)
    n = teacher.config.num_hidden_layers
    blocks = windows(tokenize_text_file(args.text, tok), args.context, args.windows)
    pre, block, coda = default_split(n)
    splits = args.splits or [f"{span(pre)}/{span(block)}/{span(coda)}", "0-3/18-25/26-29", "0-3/14-25/26-29",
                             "0-5/18-25/26-29", "0-3/10-21/22-29", "0-7/16-23/24-29", "0-3/22-25/26-29"]
    t0 = time.time()
    base = perplexity(teacher, blocks)["ppl"]
    print(f"{args.source}: {n} layers; perplexity on {args.text} ({blocks.shape[0]} x {args.context} tokens); "
          f"default split by the paper's rule: {span(pre)} / {span(block)} / {span(coda)}")
    print("| split (prelude / block / coda) | layers kept | dropped | untrained ppl (1 passthrough loop) | "
          "x source | MFLOPs/token @ 4 loops |")
    print("|---|---|---|---|---|---|")
    print(f"| source | {n} | 0 | {base:.2f} | 1.00x | {flops_per_token(teacher, args.context) / 1e6:.0f} |")
    for s in splits:
        p, b, c = s.split("/")
        student = convert(teacher, "retrofit", options={"prelude": p, "block": b, "coda": c, "recurrence": 1,
                                                        "adapter_init": "passthrough", "state_init": "zeros"})
        kept = sum(m != "dropped" for m in student.config.layer_mixers)
        ppl = perplexity(student, blocks)["ppl"]
        flops = flops_per_token(student, args.context, recurrence=4) / 1e6
        print(f"| {p} / {b} / {c} | {kept} | {n - kept} | {ppl:.2f} | {ppl / base:.2f}x | {flops:.0f} |")
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
