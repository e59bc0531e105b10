"""Regions of a loss that are recomputed in the backward pass instead of kept: a block of layers in attention transfer
(``stages.py``, ``layers_per_block``). The forward keeps only a region's inputs;
the backward runs the region again, one region at a time, so at most one region's graph is alive.

``torch.utils.checkpoint`` (non-reentrant: works under DDP and FSDP2, and with inputs that need no gradient). The
memory plan (``pipeline/memory_plan.py``) cannot see a recomputed region's graph in the forward, so it sets
``PROBE``: a callable given each region's function and inputs, which traces the region whole on ``meta`` tensors
to learn the memory its backward will hold.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.checkpoint import checkpoint

PROBE: Callable | None = None


def recomputed(fn: Callable, *args):
    """``fn(*args)``, its intermediate tensors freed after the forward and rebuilt in the backward pass. ``fn`` must
    be deterministic (the rebuilt values are the ones the gradient is taken of)."""
    if PROBE is not None:
        PROBE(fn, args)
    return checkpoint(fn, *args, use_reentrant=False)


__all__ = ["recomputed"]
