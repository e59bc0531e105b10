"""Sliding window + sink tokens softmax in every converted layer, no memory of older tokens
(``modeling/mixer_window.py``): the baseline every window + memory method is measured against."""

from pydantic import Field

from ..modeling.mixer_window import WindowMixer
from .method import Conversion, MethodOptions, Paper

_DEFAULTS = WindowMixer.SETTINGS  # each default declared once, by the mixer that reads it


class WindowOptions(MethodOptions):
    window: int = Field(_DEFAULTS["window"], ge=1, description="softmax window in tokens")
    sinks: int = Field(_DEFAULTS["sinks"], ge=0, description="first tokens kept in the softmax part (attention sinks)")


class Window(Conversion):
    name = "window"
    summary = "sliding window + sink tokens softmax, older tokens forgotten (the window-only baseline)"
    paper = Paper("Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2024)",
                  "https://arxiv.org/abs/2309.17453")
    Options = WindowOptions
    mixers = (WindowMixer,)
    test_options = {"window": 4, "sinks": 2}


METHOD = Window()
