"""The method registry: one line per method; the name is the module under rnnify/convert/ that defines METHOD.
Everything else that knows about methods (CLI flags, recipe validation, ``rnnify ls``, model cards, the test
matrix) reads ``METHODS``."""

from __future__ import annotations

import importlib

from ..errors import RnnifyError
from .method import Method

# The registry: one line per method; the name is the module under rnnify/convert/ that defines METHOD.
_REGISTERED = (
    "supra",
    "lolcats",
    "mamba_in_llama",
    "window",
    "ahn",
    "retrofit",
    "statex",
    "gated_deltanet",
)

METHODS: dict[str, Method] = {}
for _name in _REGISTERED:
    _method = importlib.import_module(f".{_name}", __package__).METHOD
    assert _method.name == _name, f"rnnify/convert/{_name}.py registers {_method.name!r}"
    METHODS[_name] = _method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RnnifyError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_options(method: str, options: dict | None) -> dict:
    """Fill defaults and reject settings the method does not have."""
    return get_method(method).resolve_options(options)


__all__ = ["METHODS", "get_method", "resolve_options"]
