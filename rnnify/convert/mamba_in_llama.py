"""Mamba-in-the-Llama hybrid (Wang et al. 2024): Mamba2 mixers initialised from attention.

Chosen layers become Mamba2 mixers with x <- V, B <- K, C <- Q, out_proj <- O; the rest stay attention. Pick them
with ``--attention-fraction`` (0.5 / 0.25 / 0.125 / 0, spread evenly), ``--attention-every`` or an explicit
``--keep-attention`` list (``modeling/mixer_mamba2.py``).
"""

from typing import Literal

from pydantic import Field

from ..modeling.mixer_mamba2 import Mamba2Mixer
from .method import Conversion, MethodOptions, Paper

_DEFAULTS = Mamba2Mixer.SETTINGS  # each default declared once, by the mixer that reads it


class MambaInLlamaOptions(MethodOptions):
    chunk_size: int = Field(_DEFAULTS["chunk_size"], ge=1, description="chunk length of the parallel (chunked) form")
    conv_kernel: int = Field(_DEFAULTS["conv_kernel"], ge=2, description="Mamba2 short convolution width")
    conv_init: Literal["default", "identity"] = Field(
        _DEFAULTS["conv_init"], description="Mamba2's random conv init, or a pass-through conv (the untrained mixer is "
                                            "then linear attention)")


class MambaInLlama(Conversion):
    name = "mamba_in_llama"
    summary = "Mamba-in-the-Llama: Mamba2 mixers initialised from attention (x<-V, B<-K, C<-Q, out<-O)"
    paper = Paper("The Mamba in the Llama: Distilling and Accelerating Hybrid Models (Wang et al., 2024)",
                  "https://arxiv.org/abs/2408.15237")
    Options = MambaInLlamaOptions
    mixers = (Mamba2Mixer,)
    test_options = {"chunk_size": 8}
    test_variants = {"identity_conv": {"conv_init": "identity"}}


METHOD = MambaInLlama()
