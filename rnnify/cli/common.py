"""What several command groups share: the log line, argument types and the flags that choose kept layers."""

from __future__ import annotations

import argparse
import sys

from ..convert import METHODS
from ..convert.method import Transform
from ..sources import ALIASES, DEFAULT_MODEL

MODEL_HELP = f"Hub repo id, local folder, .gguf file or alias ({', '.join(ALIASES)}); default {DEFAULT_MODEL}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def methods_help() -> str:
    return ", ".join(f"{n}{' (transform)' if isinstance(m, Transform) else ''}" for n, m in sorted(METHODS.items()))


def ints(text: str) -> list[int]:
    """'1024,2048' -> [1024, 2048] (argparse type: comma-separated integers)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def flat(groups) -> list[int]:
    """[[1024, 2048], [4096]] (``--x 1024,2048 4096``) -> [1024, 2048, 4096]."""
    return [n for g in groups for n in g]


def add_layer_choice(s) -> None:
    s.add_argument("--keep-attention", default=None,
                   help="layers that stay softmax attention, e.g. 0,15 or 0-3; or auto:N / auto:10%%@4096 (chosen "
                        "by measured layer scores, see rnnify select-layers)")
    s.add_argument("--select-text", default=None, help="text that auto:... scores layers on (default: "
                                                       "builtin:wikitext-2/valid.txt)")
    s.add_argument("--select-mode", choices=["restore", "convert"], default="restore",
                   help="how auto:... scores layers (default restore: KL-guided, see rnnify select-layers)")
    s.add_argument("--select-tokens", type=int, default=4096,
                   help="tokens of --select-text that auto:... scores on (default 4096)")
    s.add_argument("--attention-fraction", type=float, default=None,
                   help="share of layers that stay attention, spread evenly (e.g. 0.5, 0.25, 0.125, 0)")
    s.add_argument("--attention-every", type=int, default=None, help="every k-th layer stays attention")


def layer_choice(args) -> dict:
    """The keyword arguments of ``convert()`` that ``add_layer_choice`` flags give."""
    return dict(keep_attention=args.keep_attention, attention_fraction=args.attention_fraction,
                attention_every=args.attention_every, select_text=args.select_text, select_mode=args.select_mode,
                select_tokens=args.select_tokens)


__all__ = ["MODEL_HELP", "add_layer_choice", "flat", "ints", "layer_choice", "log", "methods_help"]
