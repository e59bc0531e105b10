"""Recurrence ops used by every mixer, dispatched on the tensor's device.

Today every device runs the plain-PyTorch reference (``reference.py``); fused Triton kernels plug in
here behind the same signatures. ``RNNIFY_KERNELS=reference`` forces the reference.
"""

from __future__ import annotations

import os

from . import reference

BACKENDS = ("reference",)


def backend_for(device) -> str:
    """The backend that runs on ``device`` (honouring ``RNNIFY_KERNELS``)."""
    forced = os.environ.get("RNNIFY_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"RNNIFY_KERNELS={forced!r} is not an available kernel backend; accepted: {', '.join(BACKENDS)}"
            )
        return forced
    return "reference"


def chunk_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    backend_for(q.device)
    return reference.chunk_linear_attention(
        q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        chunk_size=chunk_size,
    )


def linear_attention_step(q, k, v, g, state, scale=None):
    backend_for(q.device)
    return reference.linear_attention_step(q, k, v, g, state, scale=scale)


def causal_conv1d(x, weight, bias=None, initial_state=None, activation="silu"):
    backend_for(x.device)
    return reference.causal_conv1d(x, weight, bias, initial_state, activation)


def causal_conv1d_step(x, weight, bias, state, activation="silu"):
    backend_for(x.device)
    return reference.causal_conv1d_step(x, weight, bias, state, activation)


__all__ = ["causal_conv1d", "causal_conv1d_step", "chunk_linear_attention", "linear_attention_step", "backend_for", "BACKENDS", "reference"]
