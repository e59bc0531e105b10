"""Command-line flags of ``rnnify convert`` / ``inspect``, derived from the registered methods' options.

Every option of every method becomes one ``--flag`` (``chunk_size`` -> ``--chunk-size``); methods that share an
option name share the flag, so its type must agree. A flag given for a method that has no such option is an error
naming the method's own settings (``Method.resolve_options``).
"""

from __future__ import annotations

import argparse

from .method import option_type
from .registry import METHODS

RESERVED = {"keep_attention", "attention_fraction", "attention_every", "dtype", "out", "overwrite", "method",
            "max_shard_size", "json", "model"}


def option_fields() -> dict[str, tuple[type, list | None, str, list[str]]]:
    """option name -> (type, choices, help, methods that have it)."""
    fields: dict[str, tuple] = {}
    for name, method in METHODS.items():
        for opt, info in method.Options.model_fields.items():
            if opt in RESERVED:
                raise AssertionError(f"method {name}: option {opt!r} clashes with a built-in flag of rnnify convert")
            typ, choices = option_type(info)
            if opt in fields:
                t0, c0, h0, who = fields[opt]
                if t0 is not typ:
                    raise AssertionError(f"option {opt!r} is {t0.__name__} in {who} but {typ.__name__} in {name}")
                who.append(name)
                if c0 is not None and choices is not None:
                    choices = sorted(set(c0) | set(choices))
                fields[opt] = (typ, choices or c0, h0, who)
            else:
                fields[opt] = (typ, choices, info.description or "", [name])
    return fields


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (each applies to the methods named in its help)")
    for opt, (typ, choices, help_text, who) in sorted(option_fields().items()):
        flag = "--" + opt.replace("_", "-")
        defaults = {m: METHODS[m].Options.model_fields[opt].default for m in who}
        shown = ", ".join(f"{m}: {d}" for m, d in defaults.items())
        accepted = f"; one of {', '.join(map(str, choices))}" if choices else ""
        kw = {"default": None, "dest": f"opt_{opt}", "help": f"{help_text}{accepted} ({shown})"}
        if typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:  # values are checked by the method's options model, which names what is accepted
            group.add_argument(flag, type=typ if typ in (int, float) else str, **kw)


def options_from_args(args) -> dict:
    """The method options given on the command line (flags left out are not included)."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


__all__ = ["add_method_flags", "option_fields", "options_from_args"]
