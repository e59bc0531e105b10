"""Mamba-in-the-Llama hybrid (Wang et al. 2024): Mamba2 mixers initialised from attention.

Chosen layers become Mamba2 mixers with x <- V, B <- K, C <- Q, out_proj <- O; the rest stay attention.
Pick them with ``attention_fraction`` (0.5 / 0.25 / 0.125 / 0, spread evenly), ``attention_every`` or an
explicit ``--keep-attention`` list (``modeling/mixers.py::Mamba2Mixer``).
"""

from .base import LayerPlan, plan_layers

OPTIONS = {"chunk_size": 64, "conv_kernel": 4, "conv_init": "default"}


def plan(source_config, keep_attention, options) -> LayerPlan:
    return plan_layers(source_config, "mamba2", "linear_attention", keep_attention, {**OPTIONS, **options})

# setting -> (test, what is accepted)
CHECKS = {
    "conv_init": (lambda v: v in ("default", "identity"), "accepted: default, identity"),
    "conv_kernel": (lambda v: isinstance(v, int) and v >= 2, "accepted: an integer >= 2"),
    "chunk_size": (lambda v: isinstance(v, int) and v >= 1, "accepted: a positive integer"),
}
