"""Mamba-in-the-Llama hybrid (Wang et al. 2024): Mamba2 mixers initialised from attention.

Chosen layers become Mamba2 mixers with x <- V, B <- K, C <- Q, out_proj <- O; the rest stay attention. Pick them
with ``--attention-fraction`` (0.5 / 0.25 / 0.125 / 0, spread evenly), ``--attention-every`` or an explicit
``--keep-attention`` list (``modeling/mixer_mamba2.py``).
"""

from typing import Literal

from pydantic import Field

from ..modeling.mixer_mamba2 import Mamba2Mixer
from .method import CalibratedOptions, Conversion, Paper
from .teacher_attention import fit_output_scales

_DEFAULTS = Mamba2Mixer.SETTINGS  # each default declared once, by the mixer that reads it


class MambaInLlamaOptions(CalibratedOptions):
    chunk_size: int = Field(_DEFAULTS["chunk_size"], ge=1, description="chunk length of the parallel (chunked) form")
    conv_kernel: int = Field(_DEFAULTS["conv_kernel"], ge=2, description="Mamba2 short convolution width")
    conv_init: Literal["default", "identity"] = Field(
        _DEFAULTS["conv_init"], description="Mamba2's random conv init, or a pass-through conv (the untrained mixer is "
                                            "then linear attention)")
    init: Literal["paper", "attention"] = Field(
        _DEFAULTS["init"], description="paper: Mamba2's init for z, dt, A, D, conv and norm; attention: the untrained "
                                       "mixer reads the attention's q/k/v as decayed linear attention (identity conv, "
                                       "D = 0, open gate, output scale fitted on --calibrate-tokens)")


class MambaInLlama(Conversion):
    name = "mamba_in_llama"
    summary = "Mamba-in-the-Llama: Mamba2 mixers initialised from attention (x<-V, B<-K, C<-Q, out<-O)"
    paper = Paper("The Mamba in the Llama: Distilling and Accelerating Hybrid Models (Wang et al., 2024)",
                  "https://arxiv.org/abs/2408.15237")
    Options = MambaInLlamaOptions
    mixers = (Mamba2Mixer,)
    test_options = {"chunk_size": 8}
    test_variants = {"identity_conv": {"conv_init": "identity"}, "attention_init": {"init": "attention"}}

    def calibrate(self, student, teacher, ids, options, log):
        """``init: attention``: the gated RMSNorm gives every head unit RMS whatever the attention's output size; fit
        each layer's one output scale to its attention's by least squares (as the Gated DeltaNet student)."""
        if options["init"] != "attention":
            return
        scales = fit_output_scales(student, teacher, ids, lambda m: m.norm.weight)
        log(f"mamba_in_llama: output scale fitted on {ids.shape[1]} tokens per layer: "
            + " ".join(f"{i}:{c:.3f}" for i, c in scales.items()))


METHOD = MambaInLlama()
