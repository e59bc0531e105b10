"""SUPRA linear attention (Mercat et al. 2024) in every converted layer.

ReLU feature map, RoPE after it, fixed per-head decay, GroupNorm (``modeling/mixers.py::SupraMixer``)."""

from .base import LayerPlan, plan_layers

OPTIONS = {"chunk_size": 64}


def plan(source_config, keep_attention, options) -> LayerPlan:
    return plan_layers(source_config, "supra", "linear_attention", keep_attention, {**OPTIONS, **options})

CHECKS = {"chunk_size": (lambda v: isinstance(v, int) and v >= 1, "accepted: a positive integer")}
