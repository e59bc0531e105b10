"""Conversion methods: one descriptor module each (``method.py`` says what a descriptor holds), registered here.

``convert`` turns a source model into a student by a conversion method's plan; ``transform`` rewrites an rnnify
model by a transform method. Everything else that knows about methods (CLI flags, recipe validation, ``rnnify
ls``, model cards, the test matrix) reads this registry.
"""

from __future__ import annotations

from ..errors import RnnifyError
from .auto_spec import parse_auto
from .base import SUPPORTED_MODEL_TYPES, build_student, check_supported, parse_layer_list, text_config
from .build import build_converted
from .layer_select import DEFAULT_TEXT, resolve_auto, text_ids
from .method import Conversion, Method, Transform
from .registry import METHODS, get_method, resolve_options


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
    m = get_method(method)
    opts = m.resolve_options(options)
    if isinstance(m, Transform):
        if not m.accepts(source_config):
            conversions = ", ".join(n for n, x in METHODS.items() if not isinstance(x, Transform))
            raise RnnifyError(f"method {method!r} transforms an rnnify model; convert the source first "
                              f"(with one of: {conversions}) and give the converted folder")
        if any(x is not None and x != "" for x in (keep_attention, attention_fraction, attention_every)):
            raise RnnifyError(f"method {method!r} is a transform: it keeps the model's attention layers as they are; "
                              "drop --keep-attention / --attention-fraction / --attention-every")
        m.check_source(source_config)
        return [], opts
    if getattr(text_config(source_config), "model_type", None) == "rnnify":
        transforms = ", ".join(n for n, x in METHODS.items() if isinstance(x, Transform)) or "none yet"
        raise RnnifyError("the source is already an rnnify model; convert its base model instead, or give a "
                          f"transform method (transforms: {transforms})")
    check_supported(source_config)
    m.check_source(source_config)
    if not m.keeps_attention and any(x is not None and x != "" for x in (keep_attention, attention_fraction, attention_every)):
        raise RnnifyError(f"method {method!r} does not keep attention layers; drop --keep-attention / "
                          "--attention-fraction / --attention-every")
    n = text_config(source_config).num_hidden_layers
    auto = parse_auto(keep_attention)
    if auto is not None:  # chosen by measurement when the weights are here (convert); checked for shape now
        if attention_fraction is not None or attention_every is not None:
            raise RnnifyError("give only one of --keep-attention, --attention-fraction, --attention-every")
        if auto.layers is not None and auto.layers > n:
            raise RnnifyError(f"keep-attention {auto}: the model has {n} layers")
        keep = spread_layers(n, auto.layers / n) if auto.layers else []
    else:
        keep = attention_layers(n, keep_attention, attention_fraction, attention_every)
    m.plan(source_config, keep, opts)  # the plan's own checks (e.g. a layer split) fail before any weights load
    return keep, opts


def convert(teacher, method: str, keep_attention=None, options: dict | None = None, attention_fraction=None,
            attention_every=None, *, tokenizer=None, select_text: str | None = None, select_mode: str = "restore",
            select_tokens: int = 4096, log=None):
    """Build the student of ``teacher`` for ``method`` (or, for a transform method, rewrite the rnnify model
    ``teacher``); the layers left as attention come from ``keep_attention`` (list, or ``auto:N`` / ``auto:P%@L``
    chosen by measurement on ``select_tokens`` tokens of ``select_text`` with ``tokenizer``, see layer_select.py),
    ``attention_fraction`` or ``attention_every``. A method that fits something on data (``calibrate_tokens``)
    does so on that many tokens of ``select_text`` when ``tokenizer`` is given."""
    keep, opts = validate(teacher.config, method, keep_attention, options, attention_fraction, attention_every)
    auto = parse_auto(keep_attention)
    if auto is not None and not next(teacher.parameters()).is_meta:
        if tokenizer is None:
            raise RnnifyError(f"keep-attention {auto} scores layers on text: it needs the source's tokenizer")
        keep, _ = resolve_auto(teacher, method, auto, opts, tokenizer, select_text or DEFAULT_TEXT, select_mode,
                               tokens=select_tokens, log=log or (lambda *_: None))
        (log or (lambda *_: None))(f"keep-attention {auto}: layers {keep or 'none'} chosen by {select_mode} scores")
    m = get_method(method)
    if isinstance(m, Transform):
        return transform(teacher, method, opts)
    student = build_converted(teacher, method, keep, opts)
    if tokenizer is not None and not next(teacher.parameters()).is_meta:
        tokens = int(opts.get("calibrate_tokens") or 0)
        if tokens:
            ids = text_ids(tokenizer, select_text or DEFAULT_TEXT, tokens, seq_len=tokens)[:1]
            m.calibrate(student, teacher, ids, opts, log or (lambda *_: None))
    return student


def transform(model, method: str, options: dict | None = None):
    """Rewrite the rnnify ``model`` with the transform ``method``; the result records it in ``config.transforms``."""
    m = get_method(method)
    if not isinstance(m, Transform):
        raise RnnifyError(f"method {method!r} converts a source model; it is not a transform")
    opts = m.resolve_options(options)
    validate(model.config, method, options=opts)
    out = m.apply(model, opts)
    out.config.transforms = [*getattr(model.config, "transforms", []), {"method": method, "options": opts}]
    return out


__all__ = ["METHODS", "Conversion", "Method", "Transform", "convert", "transform", "validate", "get_method", "resolve_options",
           "parse_layer_list", "SUPPORTED_MODEL_TYPES", "build_student", "text_config"]
