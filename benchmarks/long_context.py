"""Long context: a window + memory student (AHN, LoLCATs ...) against its teacher and its window-only model.

For each text: perplexity by token position (buckets; beyond the window is where the memory must help) and over the
whole context; passkey accuracy at lengths beyond the window; cache bytes per sequence at 4k and 32k tokens; decode
tokens/s after a long prompt (median of timed steps). Prints tables and writes a PNG of loss by position (the three
models, one panel per text).

    python benchmarks/long_context.py --student out/ahn_cpu
    python benchmarks/long_context.py --student out/ahn_cpu --text builtin:wikitext-2/test.txt \\
        ../shared/data/pride-and-prejudice/pg1342.txt --context 2048 --passkey 1024 2048 --plot loss_by_position.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import rnnify  # noqa: F401
from rnnify import sources
from rnnify.cache_size import cache_bytes
from rnnify.eval.passkey import passkey_accuracy
from rnnify.eval.perplexity import tokenize_text_file, windows
from rnnify.eval.report import window_baseline
from rnnify.eval.speed import decode_speed
from rnnify.units import human_bytes


@torch.no_grad()
def token_nll(model, blocks: torch.Tensor) -> torch.Tensor:
    """Next-token NLL at every position: [N, L - 1]."""
    out = []
    for b in blocks:
        logits = model(input_ids=b[None], use_cache=False).logits.float()[0, :-1]
        out.append(F.cross_entropy(logits, b[1:], reduction="none"))
    return torch.stack(out)


def buckets(L: int, window: int) -> list[tuple[int, int]]:
    """Position ranges: inside the window, then doubling spans beyond it."""
    edges = [0, max(window, 1)]
    while edges[-1] < L - 1:
        edges.append(min(L - 1, edges[-1] * 2))
    return list(zip(edges, edges[1:]))


def source_of(folder: Path) -> str:
    for name in ("recipe.yaml", "rnnify_conversion.json"):
        p = folder / name
        if p.exists():
            import yaml

            data = yaml.safe_load(p.read_text())
            return data["model"]["source"] if "model" in data else data["source"]
    raise SystemExit(f"{folder}: no recipe.yaml or rnnify_conversion.json to name the teacher; pass --teacher")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="a converted model folder (window + memory mixers)")
    ap.add_argument("--teacher", default=None, help="default: the source named in the student's folder")
    ap.add_argument("--text", nargs="+", default=["builtin:wikitext-2/test.txt"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4, help="contexts per text")
    ap.add_argument("--passkey", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--passkey-trials", type=int, default=5)
    ap.add_argument("--speed-prompt", type=int, default=2048)
    ap.add_argument("--plot", default="loss_by_position.png")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    student, tok = sources.load_source(args.student)
    teacher, _ = sources.load_source(args.teacher or source_of(Path(args.student)))
    baseline, label = window_baseline(student, teacher)
    mixers = student.mixers()
    window = min((getattr(m, "window", 0) for _, m in mixers), default=0)
    sinks = max((getattr(m, "sinks", 0) for _, m in mixers), default=0)
    trio = {"teacher": teacher, label: baseline, "student": student}
    report = {"student": args.student, "baseline": label, "texts": {}}
    print(f"student {args.student} (method {student.config.method}; window {window} + {sinks} sinks), teacher "
          f"{args.teacher or source_of(Path(args.student))}, baseline {label}")

    curves = {}
    for text in args.text:
        blocks = windows(tokenize_text_file(text, tok), args.context, args.windows)
        nll = {name: token_nll(m, blocks) for name, m in trio.items()}
        spans = buckets(args.context, window + sinks)
        print(f"\n## {text}: perplexity by position ({blocks.shape[0]} contexts of {args.context} tokens)")
        print("| positions | " + " | ".join(trio) + " | student recovers |")
        print("|---|" + "---|" * (len(trio) + 1))
        rows = []
        for a, b in spans + [(0, args.context - 1)]:
            ppl = {name: math.exp(v[:, a:b].mean().item()) for name, v in nll.items()}
            gap = ppl[label] - ppl["teacher"]
            # inside the window the baseline IS the teacher: a gap of float noise would give shares of millions
            rec = (ppl[label] - ppl["student"]) / gap if gap > 1e-3 * ppl["teacher"] else None
            span = "all" if (a, b) == (0, args.context - 1) else f"{a}-{b - 1}"
            print(f"| {span} | " + " | ".join(f"{ppl[n]:.2f}" for n in trio) + f" | {'—' if rec is None else f'{rec:.1%}'} |")
            rows.append({"positions": span, **ppl, "recovered": rec})
        report["texts"][text] = rows
        curves[text] = {name: v.mean(0) for name, v in nll.items()}

    print(f"\n## passkey accuracy ({args.passkey_trials} trials per length; the window holds {window} + {sinks} tokens)")
    print("| length | " + " | ".join(trio) + " |")
    print("|---|" + "---|" * len(trio))
    report["passkey"] = {}
    for n in args.passkey:
        acc = {name: passkey_accuracy(m, tok, n, args.passkey_trials)["accuracy"] for name, m in trio.items()}
        report["passkey"][str(n)] = acc
        print(f"| {n} | " + " | ".join(f"{acc[k]:.0%}" for k in trio) + " |")

    print("\n## cache per sequence (bf16 keys/values, fp32 states) and decode speed")
    print(f"| model | cache @ 4k | cache @ 32k | decode tok/s after {args.speed_prompt} (batch 1) |")
    print("|---|---|---|---|")
    report["cache"] = {}
    for name, m in trio.items():
        c4, c32 = cache_bytes(m, 4096), cache_bytes(m, 32768)
        speed = decode_speed(m, args.speed_prompt, new_tokens=16)["decode_tokens_per_s"]
        report["cache"][name] = {"4k": c4, "32k": c32, "decode_tokens_per_s": speed}
        shown = "could not be measured" if speed is None else f"{speed:.1f}"
        print(f"| {name} | {human_bytes(c4)} | {human_bytes(c32)} | {shown} |")

    plot(curves, args.plot, window + sinks)
    print(f"\nwrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")


def plot(curves: dict, path: str, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (text, by_model) in zip(axes[0], curves.items()):
        for name, loss in by_model.items():
            k = 32  # moving average over positions
            smooth = torch.nn.functional.avg_pool1d(loss[None, None], k, 1, padding=0)[0, 0]
            ax.plot(range(k // 2, k // 2 + smooth.numel()), smooth.numpy(), label=name)
        ax.axvline(window, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("token position (log)")
        ax.set_ylabel("next-token loss (32-token moving average)")
        ax.set_title(Path(text.replace("builtin:", "")).name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
