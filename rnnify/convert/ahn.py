"""AHN (Fang et al. 2025): every converted layer keeps a sliding window + sinks of exact softmax attention and
compresses the tokens that leave the window into an RNN memory (Gated DeltaNet, DeltaNet or Mamba2) read by every
later query; the memory's output projection starts at zero, so the conversion starts as the window-only model
(``modeling/mixer_ahn.py``). Trained by self-distillation from the same weights with full attention
(the ``self_distill`` stage).
"""

from typing import Literal

from pydantic import Field

from ..modeling.mixer_ahn import AhnMixer
from .method import Conversion, Paper
from .window import WindowOptions

_DEFAULTS = AhnMixer.SETTINGS  # each default declared once, by the mixer that reads it


class AhnOptions(WindowOptions):
    window: int = Field(_DEFAULTS["window"], ge=1,
                        description="softmax window in tokens (the paper trains with windows around 256)")
    memory: Literal["gated_deltanet", "deltanet", "mamba2"] = Field(
        _DEFAULTS["memory"], description="the RNN that compresses tokens leaving the window")
    chunk_size: int = Field(_DEFAULTS["chunk_size"], ge=1,
                            description="chunk length of the memory's parallel (chunked) form")
    band_gains: bool = Field(_DEFAULTS["band_gains"],
                             description="learn a gain per head and rotary pair on the memory's q and k (our "
                                         "addition; started at 1, so the conversion is unchanged)")


class Ahn(Conversion):
    name = "ahn"
    summary = "AHN: window + sinks softmax, tokens leaving the window compressed into an RNN memory (zero-init read)"
    paper = Paper("Artificial Hippocampus Networks for Efficient Long-Context Modeling (Fang et al., 2025)",
                  "https://arxiv.org/abs/2510.07318")
    Options = AhnOptions
    mixers = (AhnMixer,)
    test_options = {"window": 4, "sinks": 2, "chunk_size": 8}
    test_variants = {"deltanet": {"memory": "deltanet"}, "mamba2": {"memory": "mamba2"},
                     "band_gains": {"band_gains": True}}  # default: gated_deltanet


METHOD = Ahn()
