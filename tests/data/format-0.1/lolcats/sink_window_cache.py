"""Cache layer for a softmax window with sink tokens next to a linear-attention state (LoLCATs-style).

transformers' own ``hybrid_sliding`` layer keeps a window and a state but no sink tokens, and it trims the
window itself; here the mixer decides what leaves the window (it must fold the leaving keys into the
state), so the layer is a plain container with fixed-size parts:

* ``sink_k/v``   the first ``sinks`` tokens ever seen, ``[B, H, <=S, D]``;
* ``recent_k/v`` the last ``window`` non-sink tokens, ``[B, H, <=W, D]``;
* ``recurrent_states[0]`` the linear-attention state over everything older, ``[B, H, F, D+1]`` fp32
  (the last column is the normaliser);
* ``*_valid`` padding flags for the kept tokens, ``seen_tokens`` the number of positions consumed.
"""

from __future__ import annotations

import torch
from transformers import cache_utils
from transformers.cache_utils import LinearAttentionLayer

LAYER_TYPE = "hybrid_sliding_sink"


class SinkWindowLinearLayer(LinearAttentionLayer):
    def __init__(self, **kwargs):
        kwargs.pop("sliding_window", None)
        super().__init__(**kwargs)
        self.sink_k = self.sink_v = self.sink_valid = None
        self.recent_k = self.recent_v = self.recent_valid = None
        self.seen_tokens = 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.sink_k = self.sink_v = self.sink_valid = None
        self.recent_k = self.recent_v = self.recent_valid = None
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        for name in ("sink_k", "sink_v", "sink_valid", "recent_k", "recent_v", "recent_valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in ("sink_k", "sink_v", "sink_valid", "recent_k", "recent_v", "recent_valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))
        if self.recurrent_states[0] is not None:
            self.recurrent_states[0] = self.recurrent_states[0].repeat_interleave(repeats, dim=0)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # the window grows until it is full: shapes are not static
        return False

    def state(self):
        return self.recurrent_states[0] if self.is_recurrent_states_initialized[0] else None

    def set_state(self, state: torch.Tensor) -> None:
        self.update_recurrent_state(state, 0)


# Register the layer type so DynamicCache(config=...) builds it for our layers.
cache_utils.DYNAMIC_LAYER_TYPE_MAPPING.setdefault(LAYER_TYPE, SinkWindowLinearLayer)
cache_utils.STATIC_LAYER_TYPE_MAPPING.setdefault(LAYER_TYPE, SinkWindowLinearLayer)
