"""Conversion methods, one module each, registered by name.

A method module exposes ``OPTIONS`` (its settings and their defaults) and ``plan(source_config,
keep_attention, options) -> LayerPlan``; ``convert`` turns the plan into a student initialised from the
teacher.
"""

from __future__ import annotations

from ..errors import RnnifyError
from . import lolcats, mamba_in_llama, supra
from .base import SUPPORTED_MODEL_TYPES, build_student, check_supported, parse_layer_list, text_config

METHODS = {
    "supra": supra,
    "lolcats": lolcats,
    "mamba_in_llama": mamba_in_llama,
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
    resolved = {**mod.OPTIONS, **options}
    for name, value in resolved.items():
        check = getattr(mod, "CHECKS", {}).get(name)
        if check is not None and not check[0](value):
            raise RnnifyError(f"method {method!r}: {name}={value!r} is not accepted; {check[1]}")
    return resolved


def spread_layers(num_layers: int, fraction: float) -> list[int]:
    """``round(fraction * L)`` layer indices spread evenly over the depth, starting at layer 0."""
    if not 0 <= fraction <= 1:
        raise RnnifyError(f"attention fraction {fraction} is not in [0, 1]; e.g. 0.5, 0.25, 0.125 or 0")
    n = round(fraction * num_layers)
    return sorted({min(num_layers - 1, round(i * num_layers / n)) for i in range(n)}) if n else []


def attention_layers(num_layers: int, keep_attention=None, attention_fraction=None, attention_every=None) -> list[int]:
    """Which layers stay attention, from exactly one of: an explicit list, a fraction, every k-th layer."""
    given = [x is not None and x != [] and x != "" for x in (keep_attention, attention_fraction, attention_every)]
    if sum(given) > 1:
        raise RnnifyError("give only one of --keep-attention, --attention-fraction, --attention-every")
    if attention_fraction is not None:
        return spread_layers(num_layers, float(attention_fraction))
    if attention_every is not None:
        k = int(attention_every)
        if k < 1:
            raise RnnifyError(f"--attention-every {k}: must be >= 1 (every k-th layer stays attention)")
        return list(range(0, num_layers, k))
    return parse_layer_list(keep_attention, num_layers)


def validate(source_config, method: str, keep_attention=None, options: dict | None = None,
             attention_fraction=None, attention_every=None):
    """Check a conversion request against the source's config (no weights): returns (layers kept, options)."""
    get_method(method)
    check_supported(source_config)
    n = text_config(source_config).num_hidden_layers
    keep = attention_layers(n, keep_attention, attention_fraction, attention_every)
    return keep, resolve_options(method, options)


def convert(teacher, method: str, keep_attention=None, options: dict | None = None, attention_fraction=None,
            attention_every=None):
    """Build the student of ``teacher`` for ``method``; the layers left as attention come from
    ``keep_attention`` (list), ``attention_fraction`` or ``attention_every``."""
    keep, opts = validate(teacher.config, method, keep_attention, options, attention_fraction, attention_every)
    plan = get_method(method).plan(teacher.config, keep, opts)
    return build_student(teacher, plan, method)


__all__ = ["METHODS", "convert", "validate", "get_method", "resolve_options", "parse_layer_list", "SUPPORTED_MODEL_TYPES"]
