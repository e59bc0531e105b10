"""``select-layers``: which layers stay attention, by measured scores, for a budget."""

from __future__ import annotations

from pathlib import Path

from ..convert.auto_spec import AutoSpec, parse_auto
from ..convert.flags import add_method_flags, options_from_args
from ..errors import RnnifyError
from ..pipeline.select_layers import select_layers
from ..sources import DEFAULT_MODEL
from ..units import human_bytes
from .common import MODEL_HELP, log, methods_help


def budget(args) -> AutoSpec:
    if (args.budget_layers is None) == (args.budget_cache is None):
        raise RnnifyError("give one budget: --budget-layers N or --budget-cache P%@L (e.g. 10%@4096)")
    if args.budget_cache is not None and "%" not in args.budget_cache:
        raise RnnifyError(f"--budget-cache {args.budget_cache!r}: accepted: a share of the teacher's cache, P% or "
                          "P%@L (e.g. 10% or 10%@4096); for a number of layers use --budget-layers N")
    if args.budget_layers is not None and args.budget_layers < 0:
        raise RnnifyError(f"--budget-layers {args.budget_layers}: accepted: a number of layers >= 0")
    if args.budget_layers is not None:
        return AutoSpec(layers=args.budget_layers)
    return parse_auto(f"auto:{args.budget_cache}", label=f"--budget-cache {args.budget_cache!r}")


def run(args) -> None:
    spec = budget(args)
    r = select_layers(args.model, args.method, spec, args.out, options=options_from_args(args), text=args.text,
                      mode=args.mode, tokens=args.tokens, seq_len=args.seq_len, log=log)
    scores, keep = r["scores"], r["keep_attention"]
    meaning = "fall when the layer is restored to attention" if args.mode == "restore" \
        else "rise when the layer alone is converted"
    print(f"layer scores ({args.mode}: KL {meaning}; higher = keep)")
    top = max(max(scores), 1e-12)
    for i, v in enumerate(scores):
        print(f"  layer {i:>3} {v:>10.4f} {'#' * max(0, round(30 * v / top))}{'  <- kept' if i in keep else ''}")
    print(f"kept as attention ({spec}): {keep or 'none'}")
    for n, size in r["cache_bytes"].items():
        teacher = r["teacher_cache_bytes"][n]
        print(f"  cache @ {int(n) // 1024}k tokens: {human_bytes(size)} vs teacher {human_bytes(teacher)} "
              f"({100 * size / teacher:.1f}%)")
    out = Path(args.out)
    print(f"wrote {out / 'layer_scores.json'} and {out / 'layer_scores.png'}")
    print(f"use it: rnnify convert {args.model} --method {args.method} --keep-attention {spec}  "
          f"(or --keep-attention {','.join(map(str, keep)) or 'none'})")


def add_parser(sub) -> None:
    s = sub.add_parser("select-layers", help="score every layer by what converting it costs (inference only) and "
                                             "choose which stay attention for a budget")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    s.add_argument("--method", required=True, help=f"one of: {methods_help()}")
    s.add_argument("--budget-layers", type=int, default=None, help="keep this many layers as attention")
    s.add_argument("--budget-cache", default=None,
                   help="keep the most layers whose cache stays within P%% of the teacher's at L tokens, e.g. 10%%@4096")
    s.add_argument("--text", default="builtin:wikitext-2/valid.txt", help="text to score on (a .txt file)")
    s.add_argument("--tokens", type=int, default=4096, help="tokens of --text to score on")
    s.add_argument("--seq-len", type=int, default=None,
                   help="sequence length the tokens are cut into (default: the smaller of --tokens and 1024)")
    s.add_argument("--mode", choices=["restore", "convert"], default="restore",
                   help="restore (default): KL fall when each layer alone is restored to attention in an "
                        "all-converted model (KL-guided selection: measures layers where the hybrid lives); "
                        "convert: KL rise when each layer alone is converted")
    s.add_argument("--out", default="layer_scores", help="folder for layer_scores.json and layer_scores.png")
    add_method_flags(s)
    s.set_defaults(func=run)


__all__ = ["add_parser"]
