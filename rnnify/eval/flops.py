"""Forward FLOPs per token: the estimate used to put test-time depth (loops) and methods on one axis.

2 x every weight a token is multiplied by (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1:
C_forward ~ 2N), counting a recurrent block's layers once per loop and the LM head once, plus the token's share of
the sequence mixing: softmax attention reads keys and values of the earlier tokens (4 x heads x head_dim x keys, keys =
context / 2 on average for a causal prefix, at most the window for windowed layers) and a recurrent state is read and
written once (4 x heads x state size).
"""

from __future__ import annotations

from ..modeling import RnnifyForCausalLM
from ..modeling.layer_program import ATTENTION, Block


def _matmul_params(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2)


def _attention_keys(context: int, window: int | None) -> float:
    return min(context / 2, window) if window else context / 2


def flops_per_token(model, context: int, recurrence: int | None = None) -> float:
    head = 2 * model.get_output_embeddings().weight.numel()
    if not isinstance(model, RnnifyForCausalLM):
        cfg = model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        total = head
        for layer, kind in zip(model.model.layers, types):
            keys = _attention_keys(context, window if kind == "sliding_attention" else None)
            total += 2 * _matmul_params(layer) + 4 * heads * d * keys
        return float(total)
    base = model.config.base_config
    heads = base.num_attention_heads
    d = getattr(base, "head_dim", None) or base.hidden_size // heads

    def step_flops(step) -> float:
        layer = model.model.layers[step.layer]
        flops = 2 * _matmul_params(layer)
        if step.mixer == ATTENTION:
            sliding = model.config.layer_types[step.layer] == "sliding_attention"
            return flops + 4 * heads * d * _attention_keys(context, base.sliding_window if sliding else None)
        return flops + layer.self_attn.mixing_flops(context)  # each mixer says what its mixing costs

    total = float(head)
    blocks = iter(model.blocks)
    for item in model.program:
        if isinstance(item, Block):
            adapter = 2 * _matmul_params(next(blocks))
            total += (recurrence or item.loops) * (adapter + sum(step_flops(s) for s in item.steps))
        else:
            total += step_flops(item)
    return total


__all__ = ["flops_per_token"]
