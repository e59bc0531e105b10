"""Cache layer for a softmax window with sink tokens, optionally next to a recurrent memory of the tokens that
left the window (``mixer_window.py`` and the mixers built on it: LoLCATs, AHN).

transformers' own ``hybrid_sliding`` layer keeps a window and a state but no sink tokens, and it trims the
window itself; here the mixer decides what leaves the window (it must fold the leaving tokens into its
memory), so the layer is a plain container with fixed-size parts:

* ``sink_k/v``     the first ``sinks`` real tokens of each row, by rank (left padding moves them right),
  ``[B, <=S, Hkv, D]``;
* ``recent_k/v``   the last ``window`` positions after the first ``sinks``, ``[B, <=W, Hkv, D]``
  (``recent_sink`` flags those that are a padded row's sinks);
* ``recent_carry`` what each window token needs for its memory write when it leaves (e.g. its write gates),
  ``[B, <=W, X]``, or None;
* ``recurrent_states[0]`` the memory state over everything older (fp32), unused by the window-only mixer;
* ``*_valid`` padding flags for the kept tokens, ``valid_count`` the real tokens seen per row, ``seen_tokens``
  the number of positions consumed.

Two layer types map to it: ``sliding_sink_attention`` (window + sinks only) and ``hybrid_sliding_sink`` (with a
memory state).
"""

from __future__ import annotations

import torch
from transformers import cache_utils
from transformers.cache_utils import LinearAttentionLayer

LAYER_TYPES = ("sliding_sink_attention", "hybrid_sliding_sink")
_TENSORS = ("sink_k", "sink_v", "sink_valid", "recent_k", "recent_v", "recent_valid", "recent_sink", "recent_carry",
            "valid_count")


class SinkWindowLayer(LinearAttentionLayer):
    def __init__(self, **kwargs):
        kwargs.pop("sliding_window", None)
        super().__init__(**kwargs)
        for name in _TENSORS:
            setattr(self, name, None)
        self.seen_tokens = 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        for name in _TENSORS:
            setattr(self, name, None)
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        for name in _TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in _TENSORS:
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


# Register the layer types so DynamicCache(config=...) builds this layer for them.
for _name in LAYER_TYPES:
    cache_utils.DYNAMIC_LAYER_TYPE_MAPPING.setdefault(_name, SinkWindowLayer)
    cache_utils.STATIC_LAYER_TYPE_MAPPING.setdefault(_name, SinkWindowLayer)
