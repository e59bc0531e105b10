"""``cache``: what rnnify keeps on disk between runs, and clearing it."""

from __future__ import annotations

from ..cache_dirs import clear, usage
from ..units import human_bytes


def run(args) -> None:
    if args.clear:
        for name, size, kept in clear(args.clear):
            print(f"cleared {name}: {human_bytes(size)} freed"
                  + (f" ({kept} other item(s) in that folder kept: rnnify did not make them)" if kept else ""))
        return
    for row in usage():
        other = f" (+{row['other']} not rnnify's)" if row["other"] else ""
        print(f"{row['area']:<13} {human_bytes(row['bytes']):>10}  {row['entries']:>4} entries  {row['path']}{other}")
        print(f"{'':<13} {row['holds']}")


def add_parser(sub) -> None:
    s = sub.add_parser("cache", help="size of rnnify's caches (dequantized GGUF sources, packed tokens, layer "
                                     "scores); --clear removes them (each is rebuilt when needed)")
    s.add_argument("--clear", nargs="+", metavar="AREA", default=None,
                   help="areas to remove: sources, tokens, layer_scores, or all")
    s.set_defaults(func=run)


__all__ = ["add_parser"]
