"""The one table of recurrence ops: op -> backend -> function, with example arguments for each op.

Everything else that names ops derives from ``OPS``: the dispatching functions ``rnnify.kernels.<op>``, the
ahead-of-time compile run (``fused/aot.py``), the Triton-against-reference tests and ``benchmarks/kernel_speed.py``.
Adding an op is its reference function in ``reference.py``, its Triton function under ``fused/`` (and, optionally,
a flash-linear-attention wrapper in ``fla_backend.py``), and one ``Op`` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "triton", "fla")
_PACKAGE = __name__.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Op:
    """One recurrence op. ``modules`` maps each backend to the module (relative to ``rnnify.kernels``) that holds a
    function named ``name`` with the reference's signature. ``step``: a decode step, which the fused backends run
    in place on the state, so a step that autograd must see takes the reference. ``examples(B, T, H, D, dtype,
    gen)`` lists (args, kwargs) that exercise every code path of the op (with and without a decay, a state ...), on
    ``gen``'s device; the last one takes the most inputs (the benchmark times it)."""

    name: str
    modules: dict
    step: bool
    examples: Callable

    def function(self, backend: str):
        """The ``backend``'s function (its module is imported on first use: triton and fla are optional)."""
        key = (self.name, backend)
        if key not in _RESOLVED:
            if backend not in self.modules:
                raise ValueError(f"op {self.name!r} has no {backend!r} backend; it has: {', '.join(self.modules)}")
            _RESOLVED[key] = getattr(importlib.import_module(f"{_PACKAGE}.{self.modules[backend]}"), self.name)
        return _RESOLVED[key]


_RESOLVED: dict = {}


def _backends(fused: str, fla: str = "fla_backend") -> dict:
    return {"reference": "reference", "triton": f"fused.{fused}", "fla": fla}


def _randn(gen, *shape):
    """Examples are made on the generator's device (the benchmark builds them on the GPU)."""
    return torch.randn(*shape, generator=gen, device=gen.device)


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, device=gen.device)


def _qkv(B, T, H, D, dtype, gen, normalise_k=False):
    q, k, v = (_randn(gen, B, T, H, D) for _ in range(3))
    k = F.normalize(k, dim=-1) if normalise_k else k  # the delta rule is stable for ||k|| <= 1
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _decays(B, T, H, gen):
    """No decay, a per-head constant (log) decay, and a data-dependent one (fp32, as the mixers pass them)."""
    return None, -_rand(gen, H) * 0.5, F.logsigmoid(_randn(gen, B, T, H) + 2)


def _chunk_linear_attention(B, T, H, D, dtype, gen):
    q, k, v = _qkv(B, T, H, D, dtype, gen)
    state = _randn(gen, B, H, D, D)
    return [((q, k, v, g), dict(initial_state=state if g is not None else None, output_final_state=True))
            for g in _decays(B, T, H, gen)]


def _chunk_delta_rule(B, T, H, D, dtype, gen):
    q, k, v = _qkv(B, T, H, D, dtype, gen, normalise_k=True)
    beta = _rand(gen, B, T, H).to(dtype)
    state = _randn(gen, B, H, D, D)
    return [((q, k, v, beta, g), dict(initial_state=state if g is not None else None, output_final_state=True))
            for g in (None, _decays(B, T, H, gen)[2])]


def _linear_attention_step(B, T, H, D, dtype, gen):
    q, k, v = (x[:, 0] for x in _qkv(B, 1, H, D, dtype, gen))
    return [((q, k, v, g, _randn(gen, B, H, D, D)), {})
            for g in (None, -_rand(gen, H), -_rand(gen, B, H))]


def _delta_rule_step(B, T, H, D, dtype, gen):
    q, k, v = (x[:, 0] for x in _qkv(B, 1, H, D, dtype, gen, normalise_k=True))
    beta = _rand(gen, B, H).to(dtype)
    return [((q, k, v, beta, g, _randn(gen, B, H, D, D)), {})
            for g in (None, -_rand(gen, B, H))]


def _causal_conv1d(B, T, H, D, dtype, gen, width=4):
    channels = H * D
    x = _randn(gen, B, T, channels).to(dtype)
    w, b = _randn(gen, channels, width).to(dtype), _randn(gen, channels).to(dtype)
    state = _randn(gen, B, channels, width - 1).to(dtype)
    return [((x, w, b), {}), ((x, w, None, state, None), {})]


def _causal_conv1d_step(B, T, H, D, dtype, gen, width=4):
    (x, w, b), _ = _causal_conv1d(B, 1, H, D, dtype, gen, width)[0]
    return [((x[:, 0], w, b, _randn(gen, B, H * D, width - 1).to(dtype)), {})]


OPS = {op.name: op for op in (
    Op("chunk_linear_attention", _backends("linear_attention"), step=False, examples=_chunk_linear_attention),
    Op("linear_attention_step", _backends("linear_attention"), step=True, examples=_linear_attention_step),
    Op("chunk_delta_rule", _backends("delta_rule"), step=False, examples=_chunk_delta_rule),
    Op("delta_rule_step", _backends("delta_rule"), step=True, examples=_delta_rule_step),
    # flash-linear-attention has no short-convolution op with this signature: its backend runs ours
    Op("causal_conv1d", _backends("conv", fla="fused.conv"), step=False, examples=_causal_conv1d),
    Op("causal_conv1d_step", _backends("conv", fla="fused.conv"), step=True, examples=_causal_conv1d_step),
)}


def functions(backend: str) -> dict:
    """op name -> the ``backend``'s function, for every op (imports the backend's modules)."""
    return {name: op.function(backend) for name, op in OPS.items()}
