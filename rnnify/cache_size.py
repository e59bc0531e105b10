"""Decoding cache size per sequence, by layer type: the bytes a model has to keep after ``seq_len`` tokens (planned
from the config and mixers, or measured on a cache object), the formatter is units.human_bytes."""

from __future__ import annotations

import torch

from .modeling import RnnifyForCausalLM
from .modeling.configuration_rnnify import base_layer_types
from .modeling.layer_program import ATTENTION, Block


def _geometry(cfg):
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def attention_cache_bytes(cfg, layer_type: str, seq_len: int, batch: int = 1, kv_bytes: int = 2) -> int:
    _, kv, head_dim = _geometry(cfg)
    kept = seq_len
    if layer_type == "sliding_attention" and getattr(cfg, "sliding_window", None):
        kept = min(seq_len, cfg.sliding_window - 1)  # transformers keeps window - 1 past tokens
    return batch * 2 * kv * head_dim * kept * kv_bytes


def cache_bytes_per_layer(model, seq_len: int, batch: int = 1, kv_bytes: int = 2, recurrence: int | None = None) -> list[int]:
    """Bytes per executed step (cache slot) for a teacher (any transformers causal LM) or an rnnify model; a block
    counts once per loop (``recurrence`` loops, default the block's own count)."""
    if isinstance(model, RnnifyForCausalLM):
        base = model.config.base_config

        def step_bytes(step):
            if step.mixer == ATTENTION:
                return attention_cache_bytes(base, model.config.layer_types[step.layer], seq_len, batch, kv_bytes)
            return model.model.layers[step.layer].self_attn.cache_bytes(seq_len, batch, kv_bytes)

        out = []
        for item in model.program:
            if isinstance(item, Block):
                out += [step_bytes(s) for _ in range(recurrence or item.loops) for s in item.steps]
            else:
                out.append(step_bytes(item))
        return out
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "model_type", None) == "mamba2":  # transformers' Mamba2: conv window + SSM state per layer
        inner = int(cfg.expand * cfg.hidden_size)
        conv = (inner + 2 * cfg.n_groups * cfg.state_size) * (cfg.conv_kernel - 1) * kv_bytes
        ssm = cfg.num_heads * cfg.head_dim * cfg.state_size * 4
        return [batch * (conv + ssm)] * cfg.num_hidden_layers
    return [attention_cache_bytes(cfg, t, seq_len, batch, kv_bytes) for t in base_layer_types(cfg)]


def cache_bytes(model, seq_len: int, batch: int = 1, kv_bytes: int = 2, recurrence: int | None = None) -> int:
    return sum(cache_bytes_per_layer(model, seq_len, batch, kv_bytes, recurrence))


def measured_cache_bytes(cache) -> int:
    """Bytes of keys, values and states actually held by a cache object (every floating tensor it references;
    boolean padding flags are bookkeeping and not counted)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.is_floating_point() and t.numel() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for layer in cache.layers:
        for val in vars(layer).values():
            if isinstance(val, dict):
                for v in val.values():
                    add(v)
            else:
                add(val)
    return total
