"""LoLCATs-style window + sinks softmax with Hedgehog linear attention (Zhang et al. 2024).

Hedgehog linear attention over old tokens plus a softmax
window of the last ``window`` tokens and the first ``sinks`` tokens (``modeling/mixers.py::LolcatsMixer``).

Defaults: window 64 as in LoLCATs; 4 sink tokens, which on SmolLM2-135M take a 64-token window from 3.3x
to 1.5x the teacher's perplexity (DESIGN.md).
"""

from .base import LayerPlan, plan_layers

OPTIONS = {"window": 64, "sinks": 4, "chunk_size": 64, "init_linear_mix_logit": -6.0, "linear_branch": True}


def plan(source_config, keep_attention, options) -> LayerPlan:
    return plan_layers(source_config, "lolcats", "hybrid_sliding_sink", keep_attention, {**OPTIONS, **options})

# setting -> (test, what is accepted)
CHECKS = {
    "window": (lambda v: isinstance(v, int) and v >= 1, "accepted: an integer >= 1"),
    "sinks": (lambda v: isinstance(v, int) and v >= 0, "accepted: an integer >= 0"),
    "chunk_size": (lambda v: isinstance(v, int) and v >= 1, "accepted: a positive integer"),
    "linear_branch": (lambda v: isinstance(v, bool), "accepted: true or false"),
}
