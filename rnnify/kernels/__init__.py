"""Recurrence ops used by every mixer, dispatched on the tensor's device.

Backends (same signatures, same results within dtype tolerance):
  - ``reference``: plain PyTorch (``reference.py``); runs anywhere and is the ground truth;
  - ``triton``: rnnify's fused kernels (``fused/``); the default for CUDA tensors;
  - ``fla``: flash-linear-attention, when installed (``pip install 'rnnify[fla]'``), for comparison.

The choice follows the tensor's device, never what happens to be importable: CUDA tensors take ``triton``,
everything else ``reference``. ``RNNIFY_KERNELS=reference|triton|fla`` forces one; a forced backend that
cannot run here raises an error that says why (``triton`` runs CPU tensors only under ``TRITON_INTERPRET=1``).

The ops and their backends are one table, ``ops.OPS``; each op is a function here, ``rnnify.kernels.<op>``.
Decode steps (``*_step``) update the state in place when the backend can (triton, for a contiguous fp32
state outside autograd) and always return the new state: callers store what is returned.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import reference
from .ops import BACKENDS, OPS, Op


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


def implementation(op: str, device):
    """The function that runs ``op`` for tensors on ``device``."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; accepted: {', '.join(OPS)}")
    return OPS[op].function(backend_for(device))


def _stepping_in_autograd(args) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in args)


def _dispatcher(op: Op):
    """``rnnify.kernels.<op>``: the backend's function for the first argument's device. Steps that autograd must
    see run the reference (the fused steps write the state in place)."""
    reference_fn = op.function("reference")

    @functools.wraps(reference_fn)
    def run(*args, **kwargs):
        if op.step and _stepping_in_autograd((*args, *kwargs.values())):
            return reference_fn(*args, **kwargs)
        return implementation(op.name, args[0].device)(*args, **kwargs)
    return run


globals().update({name: _dispatcher(op) for name, op in OPS.items()})

__all__ = ["BACKENDS", "OPS", "backend_for", "implementation", "reference", "unavailable_reason", *OPS]
