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


__all__ = ["TeacherAttention"]
