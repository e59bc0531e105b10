"""Recurrence ops used by every mixer, dispatched on the tensor's device.

Backends (same signatures, same results within dtype tolerance):
  - ``reference``: plain PyTorch (``reference.py``); runs anywhere and is the ground truth;
  - ``triton``: rnnify's fused kernels (``fused/``); the default for CUDA tensors;
  - ``fla``: flash-linear-attention, when installed (``pip install 'rnnify[fla]'``), for comparison.

The choice follows the tensor's device, never what happens to be importable: CUDA tensors take ``triton``,
everything else ``reference``. ``RNNIFY_KERNELS=reference|triton|fla`` forces one; a forced backend that
cannot run here raises an error that says why (``triton`` runs CPU tensors only under ``TRITON_INTERPRET=1``).

Decode steps (``*_step``) update the state in place when the backend can (triton, for a contiguous fp32
state outside autograd) and always return the new state: callers store what is returned.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import reference

BACKENDS = ("reference", "triton", "fla")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device) -> str | None:
    """Why ``backend`` cannot run tensors on ``device`` (None when it can)."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device.type != "cuda" and not _interpreting():
            return (f"the Triton kernels run on CUDA tensors, these are on {device.type}; set TRITON_INTERPRET=1 to run "
                    "them in Triton's interpreter on the CPU (slow: meant for tests)")
        return None
    if backend == "fla":
        if importlib.util.find_spec("fla") is None:
            return "flash-linear-attention is not installed (pip install 'rnnify[fla]')"
        if device.type != "cuda":
            return f"flash-linear-attention only runs on CUDA tensors, these are on {device.type}"
        return None
    raise ValueError(f"unknown kernel backend {backend!r}; accepted: {', '.join(BACKENDS)}")


def backend_for(device) -> str:
    """The backend that runs tensors on ``device`` (honouring ``RNNIFY_KERNELS``)."""
    forced = os.environ.get("RNNIFY_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"RNNIFY_KERNELS={forced!r} is not a kernel backend; accepted: {', '.join(BACKENDS)}"
            )
        reason = unavailable_reason(forced, device)
        if reason:
            raise RuntimeError(f"RNNIFY_KERNELS={forced} cannot run here: {reason}")
        return forced
    if torch.device(device).type == "cuda" and unavailable_reason("triton", device) is None:
        return "triton"
    return "reference"


_MODULES = {
    "reference": {name: "rnnify.kernels.reference" for name in (
        "chunk_linear_attention", "linear_attention_step", "chunk_delta_rule", "delta_rule_step",
        "causal_conv1d", "causal_conv1d_step")},
    "triton": {
        "chunk_linear_attention": "rnnify.kernels.fused.linear_attention",
        "linear_attention_step": "rnnify.kernels.fused.linear_attention",
        "chunk_delta_rule": "rnnify.kernels.fused.delta_rule",
        "delta_rule_step": "rnnify.kernels.fused.delta_rule",
        "causal_conv1d": "rnnify.kernels.fused.conv",
        "causal_conv1d_step": "rnnify.kernels.fused.conv",
    },
}
_MODULES["fla"] = {name: "rnnify.kernels.fla_backend" for name in _MODULES["triton"]}


def implementation(op: str, device):
    """The function that runs ``op`` for tensors on ``device``."""
    backend = backend_for(device)
    return getattr(importlib.import_module(_MODULES[backend][op]), op)


def _stepping_in_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _step(op: str, device, tensors, state):
    """Steps run the reference when autograd must see them (the fused steps write in place)."""
    if _stepping_in_autograd(*tensors, state):
        return getattr(reference, op)
    return implementation(op, device)


def chunk_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                           cu_seqlens=None):
    """Chunked linear attention with per-head scalar log-decay ``g`` (None, [H] or [B, T, H]); see reference.py."""
    return implementation("chunk_linear_attention", q.device)(
        q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        chunk_size=chunk_size, cu_seqlens=cu_seqlens)


def linear_attention_step(q, k, v, g, state, scale=None):
    return _step("linear_attention_step", q.device, (q, k, v, g), state)(q, k, v, g, state, scale=scale)


def chunk_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                     cu_seqlens=None):
    """Chunked (gated) delta rule; see reference.py."""
    return implementation("chunk_delta_rule", q.device)(
        q, k, v, beta, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        chunk_size=chunk_size, cu_seqlens=cu_seqlens)


def delta_rule_step(q, k, v, beta, g, state, scale=None):
    return _step("delta_rule_step", q.device, (q, k, v, beta, g), state)(q, k, v, beta, g, state, scale=scale)


def causal_conv1d(x, weight, bias=None, initial_state=None, activation="silu", cu_seqlens=None):
    return implementation("causal_conv1d", x.device)(x, weight, bias, initial_state, activation, cu_seqlens=cu_seqlens)


def causal_conv1d_step(x, weight, bias, state, activation="silu"):
    return _step("causal_conv1d_step", x.device, (x, weight, bias), state)(x, weight, bias, state, activation)


__all__ = [
    "BACKENDS", "backend_for", "causal_conv1d", "causal_conv1d_step", "chunk_delta_rule", "chunk_linear_attention",
    "delta_rule_step", "implementation", "linear_attention_step", "reference", "unavailable_reason",
]
