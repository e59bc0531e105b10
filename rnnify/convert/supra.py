"""SUPRA (Mercat et al. 2024): every attention layer becomes linear attention with a ReLU feature map,
fixed per-head decay and GroupNorm (see ``modeling/mixers.py::SupraMixer``)."""

from .base import LayerPlan, plan_layers

OPTIONS = {"chunk_size": 64}


def plan(source_config, keep_attention, options) -> LayerPlan:
    return plan_layers(source_config, "supra", "linear_attention", keep_attention, {**OPTIONS, **options})
