"""The source model's attention standing in for a converted layer (stepwise distillation, layer scoring)."""

from __future__ import annotations

import torch
from torch import nn


class TeacherAttention(nn.Module):
    """A frozen teacher attention standing in for a converted layer that is not active yet (stepwise
    distillation). It builds its own causal mask: the student makes none for converted layers."""

    def __init__(self, attn):
        super().__init__()
        self.attn = [attn]  # a list, so the teacher's weights are not registered (nor trained, nor saved) here

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        T = hidden_states.shape[1]
        mask = torch.full((T, T), float("-inf"), device=hidden_states.device, dtype=hidden_states.dtype).triu(1)
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        return self.attn[0](hidden_states, position_embeddings=position_embeddings, attention_mask=mask[None, None],
                            **kwargs)


def attention_io(teacher, layers, input_ids) -> dict:
    """{layer: (hidden_states, position_embeddings, output)} of the teacher's attention in ``layers`` for one forward
    of ``input_ids`` without gradients: what a converted layer is fitted to (attention transfer, calibration)."""
    captured, hooks = {}, []
    for i in layers:
        def hook(module, args, kwargs, output, i=i):
            h = kwargs.get("hidden_states", args[0] if args else None)
            captured[i] = (h, kwargs.get("position_embeddings"), output[0] if isinstance(output, tuple) else output)
        hooks.append(teacher.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            teacher.model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def fit_output_scales(student, teacher, input_ids, scale_of) -> dict:
    """Per converted layer of ``student``, the one scale c minimising |c (y - b) - (t - b)|^2 between the layer's
    output y and the teacher attention's t on the teacher's own inputs for ``input_ids`` (b: o_proj's / out_proj's
    bias), folded into the tensor ``scale_of(mixer)`` that the output is linear in (a norm's weight). Returns
    {layer: c}."""
    mixers = dict(student.mixers())
    captured = attention_io(teacher, list(mixers), input_ids)
    scales = {}
    with torch.no_grad():
        for i, m in mixers.items():
            h, pe, target = captured[i]
            y, _ = m(h, position_embeddings=pe, attention_mask=None)
            out = getattr(m, "o_proj", None)
            out = m.out_proj if out is None else out
            bias = out.bias if out.bias is not None else 0.0
            y, target = (y - bias).double(), (target - bias).double()
            c = float((y * target).sum() / (y * y).sum().clamp_min(1e-30))
            scale_of(m).mul_(c)
            scales[i] = c
    return scales


__all__ = ["TeacherAttention", "attention_io", "fit_output_scales"]
