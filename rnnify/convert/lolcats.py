"""LoLCATs-style window + sinks softmax with Hedgehog linear attention over older tokens (Zhang et al. 2024;
``modeling/mixer_lolcats.py``).

Defaults: window 64 as in LoLCATs; 4 sink tokens, which on SmolLM2-135M take a 64-token window from 3.3x to 1.5x
the teacher's perplexity (DESIGN.md).
"""

from pydantic import Field

from ..modeling.mixer_lolcats import LolcatsMixer
from .method import Conversion, Paper
from .window import WindowOptions

_DEFAULTS = LolcatsMixer.SETTINGS  # each default declared once, by the mixer that reads it


class LolcatsOptions(WindowOptions):
    chunk_size: int = Field(_DEFAULTS["chunk_size"], ge=1, description="chunk length of the parallel (chunked) form")
    init_linear_mix_logit: float = Field(_DEFAULTS["init_linear_mix_logit"],
                                         description="initial per-head logit of the linear part's share")
    memory_halflife: float | None = Field(
        _DEFAULTS["memory_halflife"], gt=0,
        description="a learned per-head decay of the memory, starting at this half-life in tokens (our addition, off "
                    "in the paper): the memory's weight then stops growing with the number of tokens that left the "
                    "window, so a student trained at one length keeps at longer ones")


class Lolcats(Conversion):
    name = "lolcats"
    summary = "LoLCATs-style: window + sinks softmax, Hedgehog linear attention over older tokens, learned mix"
    paper = Paper("LoLCATs: On Low-Rank Linearizing of Large Language Models (Zhang et al., 2024)",
                  "https://arxiv.org/abs/2410.10254")
    Options = LolcatsOptions
    mixers = (LolcatsMixer,)
    test_options = {"chunk_size": 8, "window": 4, "sinks": 2, "init_linear_mix_logit": 0.0}
    test_variants = {"halflife": {"memory_halflife": 16.0}}


METHOD = Lolcats()
