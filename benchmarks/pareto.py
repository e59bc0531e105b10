"""Quality against cache: perplexity at 2048 tokens and cache bytes at 4k / 32k tokens for N kept attention layers,
chosen by the measured layer scores (rnnify select-layers, restore mode) and spread evenly, before training and,
with --train RECIPE, after the recipe's stages (a short distillation) trained each plan.

    python benchmarks/pareto.py                                       # SmolLM2-135M, lolcats + mamba_in_llama
    python benchmarks/pareto.py --methods lolcats --n 0 2 4 --windows 2 --out pareto/
    python benchmarks/pareto.py --methods lolcats --n 1 2 4 8 --train quickstart \
        --train-set stages.attention_transfer.max_steps=6 stages.distill.max_steps=4   # a short distillation
    python benchmarks/pareto.py --methods mamba_in_llama --n 1 2 4 8 --train mamba_in_llama_cpu \
        --select-after attention_transfer      # selected plans scored on the model after attention transfer

Prints one table per method (and the window-only baseline keeping the same layers) and writes pareto.png and
pareto.json to --out. The texts are WikiText-2 test and Pride and Prejudice (unlike the scoring text, WikiText-2
valid).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {"wikitext-2 test": "builtin:wikitext-2/test.txt",
         "pride-and-prejudice": str(ROOT.parent / "shared/data/pride-and-prejudice/pg1342.txt")}
OPTIONS = {"lolcats": {"window": 64, "sinks": 4}, "mamba_in_llama": {}, "supra": {}, "window": {"window": 64,
                                                                                                "sinks": 4}}


def _blocks(tok, text, context, windows):
    from rnnify.eval.perplexity import tokenize_text_file
    from rnnify.eval.perplexity import windows as cut

    return cut(tokenize_text_file(text, tok), context, windows)


def trained(args, method: str, keep: list[int], blocks: dict, work: Path, select_n: int | None = None):
    """(perplexity, kept layers) of the plan after ``rnnify run`` of the --train recipe with this plan's kept layers
    (its own evaluation reduced to one student window: the rows here are computed on the benchmark's windows). With
    ``select_n`` the recipe chooses that many layers itself after stage --select-after (scores of the trained
    model). The recipe's conversion options are used for training (the untrained rows use OPTIONS)."""
    from transformers import AutoModelForCausalLM

    from rnnify.eval.perplexity import perplexity
    from rnnify.recipe import load_recipe

    recipe = load_recipe(args.train, args.train_set)
    if recipe.conversion.method != method:
        raise SystemExit(f"--train {args.train}: converts with {recipe.conversion.method}, not {method}")
    if select_n is not None:
        out = work / f"{method}-auto{select_n}-after-{args.select_after}"
        plan = [f"conversion.keep_attention=auto:{select_n}", f"conversion.select_after={args.select_after}"]
    else:
        out = work / f"{method}-{'-'.join(map(str, keep)) or 'none'}"
        plan = [f"conversion.keep_attention={json.dumps(keep)}"]
    cmd = [sys.executable, "-m", "rnnify", "run", args.train, *args.train_set, f"model.source={args.source}",
           *plan, "conversion.attention_fraction=null",
           "conversion.attention_every=null",  # the plan replaces the recipe's own choice (mamba_in_llama_cpu: 0.5)
           f"output.dir={out}", "eval.passkey_lengths=[]",
           "eval.speed_lengths=[]", "eval.continuations=0", "eval.baseline=false", "eval.teacher=false",
           "eval.num_windows=1", "--no-progress"]
    log = out.with_suffix(".log")
    try:
        with open(log, "w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"training the plan {keep} failed; see {log}")
        if select_n is not None:
            state = json.loads(out.with_name(out.name + ".run").joinpath("state.json").read_text())
            keep = state["stages"][args.select_after]["selected_layers"]
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return {k: perplexity(model, b)["ppl"] for k, b in blocks.items()}, keep
    finally:  # also when it fails or is interrupted: the model and its run state are ~0.5 GB per plan; the log stays
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".run"), ignore_errors=True)


def plot(results: dict, path: Path, context: int) -> None:
    """Perplexity against cache bytes at 4k tokens, one panel per text: selected and spread plans per method."""
    from rnnify.eval.plots import _pyplot

    plt = _pyplot()
    texts = list(results["teacher"]["perplexity"])
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for method, r in results["methods"].items():
            for plan, style in (("selected", "-o"), ("spread", "--s")):
                pts = sorted((row["cache"]["4096"] / 2**20, row["perplexity"][text]) for row in r["rows"]
                             if row["plan"] == plan or (row["n"] == 0 and plan == "spread"))
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{method} {plan}")
                done = sorted((row["cache"]["4096"] / 2**20, row["trained_perplexity"][text]) for row in r["rows"]
                              if row["plan"] == plan and "trained_perplexity" in row)
                if done:
                    ax.plot(*zip(*done), ":" + style[-1], label=f"{method} {plan}, trained")
        ax.axhline(results["teacher"]["perplexity"][text], color="gray", lw=0.8, label="teacher")
        ax.set(title=f"{results['source']}, {text} @ {context}", xlabel="cache @ 4k tokens (MiB)",
               ylabel="perplexity", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["lolcats", "mamba_in_llama"])
    ap.add_argument("--n", nargs="+", type=int, default=[0, 1, 2, 4, 8])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2, help="windows of --context tokens per text")
    ap.add_argument("--score-tokens", type=int, default=4096)
    ap.add_argument("--out", default="pareto")
    ap.add_argument("--plot", help="only redraw pareto.png from this pareto.json")
    ap.add_argument("--train", help="a recipe (name or file) whose stages train each plan; adds trained perplexity")
    ap.add_argument("--train-set", nargs="*", default=[], help="key=value overrides of the --train recipe")
    ap.add_argument("--select-after", metavar="STAGE",
                    help="with --train: the selected plans choose their layers by scores of the model trained by this "
                         "stage of the recipe (every layer converted until then: conversion.select_after)")
    args = ap.parse_args()
    if args.select_after and not args.train:
        ap.error("--select-after needs --train (it selects inside the training recipe)")
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_name("pareto.png"), args.context)
        return

    from rnnify import sources
    from rnnify.convert import convert, spread_layers
    from rnnify.convert.auto_spec import AutoSpec
    from rnnify.convert.layer_select import cached_scores, choose, plan_cache_bytes, teacher_cache_bytes
    from rnnify.eval.perplexity import perplexity
    from rnnify.io import write_json_atomic

    teacher, tok = sources.load_source(args.source, progress=lambda *_: None)
    n_layers = len(teacher.model.layers)
    texts = {k: v for k, v in TEXTS.items() if Path(v).exists() or v.startswith("builtin:")}
    blocks = {k: _blocks(tok, v, args.context, args.windows) for k, v in texts.items()}
    t_ppl = {k: perplexity(teacher, b)["ppl"] for k, b in blocks.items()}
    t_cache = {n: teacher_cache_bytes(teacher, n) for n in (4096, 32768)}
    print(f"{args.source}: teacher perplexity @ {args.context} " + ", ".join(f"{k} {v:.2f}" for k, v in t_ppl.items())
          + f"; teacher cache @4k {t_cache[4096] / 2**20:.1f} MiB, @32k {t_cache[32768] / 2**20:.1f} MiB")
    results = {"source": args.source, "teacher": {"perplexity": t_ppl, "cache": t_cache}, "methods": {},
               "train": {"recipe": args.train, "overrides": args.train_set} if args.train else None}
    out = Path(args.out)
    work = out / "train"  # the --train logs (the trained models are removed once measured)
    (work if args.train else out).mkdir(parents=True, exist_ok=True)

    def save(complete: bool) -> None:  # after every row, so an interrupted run keeps what it measured
        results["complete"] = complete
        write_json_atomic(out / "pareto.json", results, default=str)

    for method in args.methods:
        opts = OPTIONS.get(method, {})
        scores, student = cached_scores(teacher, method, opts, tok, tokens=args.score_tokens, log=lambda *_: None)
        print(f"\n{method} {opts}: layer scores (restore) " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(scores)))
        head = " ".join(f"{k[:14]:>14}" for k in texts)
        print(f"{'N':>3} {'plan':<9} {'layers':<28} {head} {'cache@4k':>10} {'cache@32k':>10}")
        rows = []
        results["methods"][method] = {"scores": scores, "rows": rows}
        for n in args.n:
            plans = {"selected": choose(scores, AutoSpec(layers=n)), "spread": spread_layers(n_layers, n / n_layers)}
            for name, keep in plans.items():
                if n == 0 and name == "spread":
                    continue
                torch.manual_seed(0)
                hybrid = convert(teacher, method, keep_attention=keep, options=opts)
                ppl = {k: perplexity(hybrid, b)["ppl"] for k, b in blocks.items()}
                cache = {str(c): plan_cache_bytes(student, keep, c) for c in (4096, 32768)}
                baseline = convert(teacher, "window", keep_attention=keep, options={"window": 64, "sinks": 4})
                base_ppl = {k: perplexity(baseline, b)["ppl"] for k, b in blocks.items()}
                row = {"n": n, "plan": name, "keep": keep, "perplexity": ppl, "window_baseline": base_ppl,
                       "cache": cache}
                del hybrid, baseline  # freed before a --train run loads its own models
                cells = " ".join(f"{ppl[k]:>7.2f} ({base_ppl[k]:>5.1f})" for k in texts)
                if args.train:
                    select_n = n if args.select_after and name == "selected" and n else None
                    t, row["trained_keep"] = trained(args, method, keep, blocks, work, select_n)
                    row["trained_perplexity"] = t
                    cells += " | trained " + " ".join(f"{t[k]:>7.2f}" for k in texts)
                    if select_n is not None:
                        cells += f" (layers {row['trained_keep']})"
                rows.append(row)
                print(f"{n:>3} {name:<9} {str(keep):<28} {cells} {cache['4096'] / 2**20:>8.2f}Mi "
                      f"{cache['32768'] / 2**20:>8.2f}Mi", flush=True)
                save(complete=False)
    print("\n(perplexity of the hybrid before training; in brackets the window-only baseline, 64 + 4 sinks, keeping "
          "the same layers" + (f"; 'trained': after the stages of {args.train} {' '.join(args.train_set)}" if args.train
                               else "") + (f"; selected plans trained with layers chosen after stage {args.select_after}"
                                           if args.select_after else "") + ")")
    save(complete=True)
    plot(results, out / "pareto.png", args.context)
    print(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}" + (f"; training logs in {work}" if args.train else ""))


if __name__ == "__main__":
    main()
