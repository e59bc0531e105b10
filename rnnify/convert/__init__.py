"""Conversion methods, one module each, registered by name.

A method module exposes ``OPTIONS`` (its settings and their defaults) and ``plan(source_config,
keep_attention, options) -> LayerPlan``; ``convert`` turns the plan into a student initialised from the
teacher.
"""

from __future__ import annotations

from ..errors import RnnifyError
from . import lolcats, supra
from .base import SUPPORTED_MODEL_TYPES, build_student, check_supported, parse_layer_list, text_config

METHODS = {
    "supra": supra,
    "lolcats": lolcats,
}


def get_method(name: str):
    if name not in METHODS:
        raise RnnifyError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_options(method: str, options: dict | None) -> dict:
    """Fill defaults and reject settings the method does not have."""
    mod = get_method(method)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(mod.OPTIONS))
    if unknown:
        accepted = ", ".join(sorted(mod.OPTIONS)) or "none"
        raise RnnifyError(f"method {method!r} has no setting {', '.join(unknown)}; its settings: {accepted}")
    return {**mod.OPTIONS, **options}


def validate(source_config, method: str, keep_attention=None, options: dict | None = None):
    """Check a conversion request against the source's config (no weights): returns (layers kept, options)."""
    get_method(method)
    check_supported(source_config)
    keep = parse_layer_list(keep_attention, text_config(source_config).num_hidden_layers)
    return keep, resolve_options(method, options)


def convert(teacher, method: str, keep_attention=None, options: dict | None = None):
    """Build the student of ``teacher`` for ``method``; ``keep_attention`` lists layers left as attention."""
    keep, opts = validate(teacher.config, method, keep_attention, options)
    plan = get_method(method).plan(teacher.config, keep, opts)
    return build_student(teacher, plan, method)


__all__ = ["METHODS", "convert", "validate", "get_method", "resolve_options", "parse_layer_list", "SUPPORTED_MODEL_TYPES"]
