"""Loop counts for training models with a recurrent block (see ``settings.RecurrenceSpec``)."""

from __future__ import annotations

import math

import torch


def mean_at(spec, step: int, total_steps: int) -> float:
    """The curriculum: the mean loop count rises from 1 to ``spec.mean`` over the first ``ramp`` share of the steps,
    linearly or as 1 - sqrt(1 - p) (McLeish et al. 2025, sec. 4: scheduling the mean recurrence)."""
    if spec.ramp <= 0:
        return spec.mean
    p = min(1.0, step / max(1.0, spec.ramp * total_steps))
    f = p if spec.ramp_shape == "linear" else 1.0 - math.sqrt(1.0 - p)
    return 1.0 + (spec.mean - 1.0) * f


def sample_loops(spec, mean: float, seed: int, step: int) -> int:
    """loops = Poisson(rate) + 1 with rate ~ LogNormal(log(mean - 1) - sigma^2 / 2, sigma): E[loops] = mean
    (Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning", eq. 2). Seeded by (seed, step)."""
    mu = mean - 1.0
    if mu <= 0:
        return 1
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tau = torch.normal(math.log(mu) - spec.sigma**2 / 2, spec.sigma, (1,), generator=g)
    loops = int(torch.poisson(tau.exp(), generator=g).item()) + 1
    return min(loops, spec.max_loops) if spec.max_loops else loops


def forward_kwargs(spec, seed: int, step: int, total_steps: int) -> dict:
    """The student's forward arguments for this step: its loop count and how many loops keep gradients."""
    if spec is None:
        return {}
    return {"recurrence": sample_loops(spec, mean_at(spec, step, total_steps), seed, step),
            "backprop_loops": spec.backprop}


__all__ = ["forward_kwargs", "mean_at", "sample_loops"]
