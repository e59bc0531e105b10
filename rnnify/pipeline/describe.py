"""What ``rnnify inspect`` reports about a model: its architecture, layers, parameters, FLOPs and cache per token,
and (with a method) the layer program and cache of its conversion, from the same ``convert()`` a real conversion
runs, applied to the model built on the meta device (no weights are read unless ``auto:`` must score layers)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .. import sources
from ..cache_size import cache_bytes
from ..convert import SUPPORTED_MODEL_TYPES, convert, get_method, validate
from ..convert.auto_spec import parse_auto
from ..convert.layer_select import DEFAULT_TEXT, resolve_auto
from ..convert.method import Transform
from ..errors import RnnifyError
from ..eval.flops import flops_per_token
from ..modeling import RnnifyConfig
from ..modeling.layer_program import describe

CACHE_LENGTHS = (4096, 32768)
SERVING_KV_BYTES = 2  # bf16 keys/values when serving


def ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for j, i in enumerate(idx):
        if start is None:
            start = i
        if j + 1 == len(idx) or idx[j + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def ranges_by_value(values: list[str]) -> str:
    """['a', 'a', 'b'] -> 'a: 0-1; b: 2'."""
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return "; ".join(f"{k}: {ranges(v)}" for k, v in groups.items())


def _cache(model) -> dict:
    return {f"{n // 1024}k": cache_bytes(model, n, kv_bytes=SERVING_KV_BYTES) for n in CACHE_LENGTHS}


def describe_model(name: str, method: str | None = None, *, keep_attention=None, options: dict | None = None,
                   attention_fraction=None, attention_every=None, select_text=None, select_mode="restore",
                   select_tokens=4096, log=None) -> dict:
    """The facts ``rnnify inspect`` prints, as a dict (``plan`` present when ``method`` is given)."""
    log = log or (lambda *_: None)
    src = sources.local_path(name, progress=log)
    config = sources.read_config(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    is_student = isinstance(config, RnnifyConfig)
    cfg = config.base_config if is_student else config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    attn_classes: dict[str, list[int]] = {}
    for i, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        attn_classes.setdefault(type(attn).__name__ if attn is not None else "(dropped)", []).append(i)
    info = {
        "model": name,
        "source": src.kind,
        "path": src.path,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "base_model_type": cfg.model_type,
        "convertible": (not is_student) and cfg.model_type in SUPPORTED_MODEL_TYPES,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "attention_heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "vocab_size": cfg.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_types": list(config.layer_types) if getattr(config, "layer_types", None) else None,
        "attention_modules": {k: ranges(v) for k, v in attn_classes.items()},
        "sliding_window": getattr(cfg, "sliding_window", None),
    }
    if is_student:
        info.update(method=config.method, transforms=config.transforms, mixer_config=config.mixer_config,
                    program=config.program,
                    layer_mixers=ranges_by_value(config.layer_mixers),
                    program_lines=describe(config.parsed_program(), config.layer_types))
    if is_student and len(getattr(model, "blocks", [])):
        loops = sorted({1, 2, 4, 8, model.default_recurrence()})
        info["flops_per_token"] = {f"{r} loops": flops_per_token(model, 2048, recurrence=r) for r in loops}
    else:
        info["flops_per_token"] = {"": flops_per_token(model, 2048)}
    info["cache_bytes_per_sequence_bf16"] = _cache(model)
    if method:
        info["plan"] = conversion_plan(name, model, method, keep_attention=keep_attention, options=options,
                                       attention_fraction=attention_fraction, attention_every=attention_every,
                                       select_text=select_text, select_mode=select_mode, select_tokens=select_tokens,
                                       log=log)
    return info


def conversion_plan(name: str, meta_model, method: str, *, keep_attention=None, options=None, attention_fraction=None,
                    attention_every=None, select_text=None, select_mode="restore", select_tokens=4096, log=None) -> dict:
    """Layer program and cache of converting ``meta_model`` (built on the meta device) with ``method``: the same
    ``convert()`` as a real conversion. ``auto:`` keeps need the weights: they load, layers are scored (cached per
    source, method and text) and the chosen list is what the meta model is converted with."""
    if isinstance(get_method(method), Transform):
        raise RnnifyError(f"inspect --method {method}: a transform's plan needs the model's weights; run "
                          f"`rnnify convert {name} --method {method} --out DIR`, then inspect DIR")
    _, opts = validate(meta_model.config, method, keep_attention, options, attention_fraction, attention_every)
    auto = parse_auto(keep_attention)
    if auto is not None:
        source, tok = sources.load_source(name, progress=log)
        keep, _ = resolve_auto(source, method, auto, opts, tok, select_text or DEFAULT_TEXT, select_mode,
                               select_tokens, log=log)
        keep_attention, attention_fraction, attention_every = keep, None, None
        del source
    student = convert(meta_model, method, keep_attention=keep_attention, options=opts,
                      attention_fraction=attention_fraction, attention_every=attention_every)
    cfg = student.config
    converted = [m for m in cfg.layer_mixers if m not in ("attention", "dropped")]
    return {
        "attention_layers": [i for i, m in enumerate(cfg.layer_mixers) if m == "attention"],
        "program": cfg.program,
        "program_lines": describe(cfg.parsed_program(), cfg.layer_types),
        "layer_types": cfg.layer_types,
        "converted_layers": len(converted),
        "mixer": ", ".join(sorted(set(converted))) or "none",
        "cache_bytes_per_sequence_bf16": _cache(student),
    }


__all__ = ["conversion_plan", "describe_model", "ranges", "ranges_by_value"]
