"""Gated DeltaNet students (Yang et al. 2025): each converted layer becomes a Gated DeltaNet mixer that keeps the
attention's q/k/v/o projections and adds the write strength, decay, short conv and output gate
(``modeling/mixer_gated_deltanet.py``). The students of KL-guided layer selection (hybrid-distillation, on the
RADLADS pipeline) and of Qwen3-Next-style hybrids; keep layers with ``--keep-attention auto:N``."""

from pydantic import Field

from ..modeling.mixer_gated_deltanet import GatedDeltaNetMixer
from .method import CalibratedOptions, Conversion, Paper
from .teacher_attention import fit_output_scales

_DEFAULTS = GatedDeltaNetMixer.SETTINGS  # each default declared once, by the mixer that reads it


class GatedDeltaNetOptions(CalibratedOptions):
    chunk_size: int = Field(_DEFAULTS["chunk_size"], ge=1, description="chunk length of the parallel (chunked) form")
    conv_kernel: int = Field(_DEFAULTS["conv_kernel"], ge=0, le=8,
                             description="width of the short causal conv over q, k, v (starts as the identity); 0: none")
    output_gate: bool = Field(_DEFAULTS["output_gate"],
                              description="the paper's per-head RMSNorm and silu output gate (starts open at one)")
    beta_init: float = Field(_DEFAULTS["beta_init"], gt=0, lt=1,
                             description="write strength of the delta rule before training (sigmoid of beta's bias)")


class GatedDeltaNet(Conversion):
    name = "gated_deltanet"
    summary = "Gated DeltaNet: delta-rule state with a data-dependent decay, from attention's q/k/v/o"
    paper = Paper("Gated Delta Networks: Improving Mamba2 with Delta Rule (Yang et al., 2025)",
                  "https://arxiv.org/abs/2412.06464")
    Options = GatedDeltaNetOptions
    mixers = (GatedDeltaNetMixer,)
    test_options = {"chunk_size": 8}
    test_variants = {"no_conv_no_gate": {"conv_kernel": 0, "output_gate": False, "calibrate_tokens": 0}}

    def calibrate(self, student, teacher, ids, options, log):
        """The untrained layer reads the attention's direction but not its size: its gated RMSNorm gives every head
        unit RMS (on SmolLM2-135M ~10x the attention's output; least-squares scales 0.05-0.6 per layer). Fit, per
        converted layer, the one scale c minimising |c (y - b) - (t - b)|^2 between the layer's output y and the
        attention's t on the source's own inputs (b: o_proj's bias), and fold it into the norm's weight (the output
        is linear in it)."""
        if not options["output_gate"]:
            return
        scales = fit_output_scales(student, teacher, ids, lambda m: m.o_norm_weight)
        log(f"gated_deltanet: output scale fitted on {ids.shape[1]} tokens per layer: "
            + " ".join(f"{i}:{c:.3f}" for i, c in scales.items()))


METHOD = GatedDeltaNet()
