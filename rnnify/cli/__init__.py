"""The ``rnnify`` command. One module per command group, each with ``add_parser(sub)`` and the functions its
commands run; they parse flags, call the library (``rnnify.pipeline`` and below) and print. ``main`` is the error
boundary.

  model.py     inspect, convert, export, push, generate
  layers.py    select-layers
  recipes.py   ls, cp, validate, run
  evaluate.py  eval
  cache.py     cache
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import RnnifyError
from . import cache, evaluate, layers, model, recipes

GROUPS = (model, layers, recipes, evaluate, cache)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (a usage dump is not what a user needs to fix a typo)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rnnify", description="Convert pretrained transformers into recurrent and hybrid models.")
    p.add_argument("--version", action="version", version=f"rnnify {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also RNNIFY_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv=None) -> int:
    """The error boundary: a user's mistake (RnnifyError) or an environment failure (OSError: disk full, no
    permission) ends in one line naming it; anything else is a bug and says so (--debug or RNNIFY_DEBUG=1 shows
    every traceback)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value overrides may follow options: rnnify run x.yaml --no-progress train.max_steps=1
            if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version, or a one-line usage error
        return e.code if isinstance(e.code, int) else 2
    debug = args.debug or os.environ.get("RNNIFY_DEBUG") == "1"
    where = f"rnnify {args.command}"
    try:
        args.func(args)
    except RnnifyError as e:
        if debug:
            raise
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            raise
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e) or type(e).__name__
        print(f"{where}: error: {what}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the boundary: a bug, said as one
        if debug:
            raise
        print(f"{where}: internal error: {type(e).__name__}: {e}\n(a bug in rnnify: rerun with --debug for the "
              "traceback and report it)", file=sys.stderr)
        return 1
    return 0


__all__ = ["build_parser", "main"]
