"""A block of layers run several times (depth recurrence), and the cache rule for loops run at different counts.

Per loop, the block's input e (the output of the layers before it) is injected into the loop state s by the
adapter, then the block runs (Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning", sec. 3;
McLeish et al. 2025, "Teaching Pretrained Language Models to Think Deeper with Retrofitted Recurrence", sec. 3):

    s_0 = init(e);    s_j = block(A [s_{j-1}; e])    for j = 1..r;    the block's output is s_r

with A a ``Linear(2d -> d)``. ``adapter_init: passthrough`` sets A = [0 | I], so A [s; e] = e and one loop is the
block applied to e: exactly the source model without the dropped layers; but then every loop computes the same thing
and more loops cannot help until training grows the state's half of A. ``damped`` (ours) sets A = [I/2 | I/2]: with
s_0 = e (``state_init: prelude``) one loop is again exactly block(e), and loop j runs the block on the midpoint of
the state and e. The block adds a residual update u to its input (block(x) = x + u(x)), so loop 2 reads
e + u(e)/2: a damped iteration around the source's single pass, whose further loops change the output from the start
(untrained they make it worse: SmolLM2 0-15 / 16-25 / 26-29 on WikiText-2, 17.6 at one loop, 61 at two).
``state_init`` picks s_0: a truncated normal (the papers'), zeros, or e itself. The normal state is drawn from
torch's generator while the block trains (fresh noise each step, as the papers train), and in eval mode from a
counter-based generator keyed on the block and each token's position (``position_noise``): the same input then gives
the same output on every call, greedy decoding is deterministic, and step-by-step decoding starts each position from
the state the parallel forward gave it.

Cache: each (loop, layer) execution has its own cache slot. When a call runs more loops than earlier calls did,
a slot that missed tokens takes them from the deepest loop that has them ("latest" strategy of Geiping et al.'s
implementation): missing keys/values are appended from that loop's entry (full attention); a recurrent state or a
sliding window, which summarise all earlier tokens, is replaced by a copy of that loop's entry.

Only torch and sibling files are imported: this file ships with converted models.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .layer_program import Block


class LoopBlock(nn.Module):
    def __init__(self, spec: Block, hidden_size: int):
        super().__init__()
        self.spec = spec
        self.hidden_size = hidden_size
        self.adapter = nn.Linear(2 * hidden_size, hidden_size, bias=False) if spec.adapter == "concat_linear" else None

    def init_new_parameters(self) -> None:
        if self.adapter is None:
            return
        d = self.hidden_size
        with torch.no_grad():
            if self.spec.adapter_init == "passthrough":
                self.adapter.weight.zero_()
                self.adapter.weight[:, d:].copy_(torch.eye(d))
            elif self.spec.adapter_init == "damped":
                self.adapter.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], 1) / 2)
            else:  # random, as the paper leaves it: small normal, seeded so conversions are reproducible
                g = torch.Generator().manual_seed(2000 + self.spec.steps[0].layer)
                self.adapter.weight.copy_(torch.randn(d, 2 * d, generator=g) * (2 * d) ** -0.5)

    def initial_state(self, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """s_0 for ``inputs`` [B, T, d] at absolute ``positions`` ([T] or [B, T]; default 0..T-1)."""
        kind = self.spec.state_init
        if kind == "prelude":
            return inputs
        if kind == "zeros":
            return torch.zeros_like(inputs)
        std = self.spec.state_std
        if self.training:
            state = torch.empty_like(inputs, dtype=torch.float32)
            nn.init.trunc_normal_(state, std=std, a=-3 * std, b=3 * std)
            return state.to(inputs.dtype)
        B, T, d = inputs.shape
        if positions is None:
            positions = torch.arange(T, device=inputs.device)
        positions = positions.to(inputs.device).expand(B, T) if positions.dim() == 2 else positions.expand(B, T)
        noise = position_noise(positions, d, key=1000 + self.spec.steps[0].layer)
        return (noise.clamp(-3, 3) * std).to(inputs.dtype)  # truncated at 3 std, as in training (clamped, not redrawn)

    def combine(self, state: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            return state
        return self.adapter(torch.cat([state, inputs], dim=-1))


_MIX1, _MIX2, _GOLDEN = -4658895280553007687, -7723592293110705685, -7046029254386353131  # splitmix64, as int64


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps; the shifts are arithmetic, which keeps it a
    fixed bijection-like mixing, enough for noise)."""
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    return z ^ (z >> 31)


def position_noise(positions: torch.Tensor, dim: int, key: int) -> torch.Tensor:
    """Standard normal noise [*positions.shape, dim], a function of (key, position, channel) alone: a counter-based
    generator (splitmix64 of the counter, two 24-bit uniforms, Box-Muller). Any device, no generator state."""
    channel = torch.arange(dim, device=positions.device, dtype=torch.int64)
    counter = (positions.to(torch.int64)[..., None] * dim + channel) * 2 + key * 1_000_003
    z = _mix(counter * _GOLDEN + _GOLDEN)
    u1 = ((z & 0xFFFFFF).to(torch.float64) + 0.5) / 2**24
    u2 = (((z >> 24) & 0xFFFFFF).to(torch.float64) + 0.5) / 2**24
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)).to(torch.float32)


def _tokens(layer) -> int | None:
    """Tokens a full-attention cache layer holds (None for other kinds of layers)."""
    if type(layer).__name__ == "DynamicLayer":
        return 0 if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0 \
            else layer.keys.shape[-2]
    return None


def catch_up_slot(cache, slot: int, donors: list[int], past: int) -> None:
    """Bring cache slot ``slot`` to the ``past`` tokens before this call from the deepest donor slot that has them
    (see the module doc). Called before any loop of the call runs, so donors hold exactly ``past`` tokens."""
    seen = cache.rnnify_slots.seen
    if seen.get(slot, 0) >= past or past == 0:
        return
    donor = next((d for d in reversed(donors) if seen.get(d, 0) == past), None)
    if donor is None:
        raise RuntimeError(f"cache slot {slot} is behind and no earlier loop holds the {past} tokens before this call")
    mine, theirs = cache.layers[slot], cache.layers[donor]
    have = _tokens(mine)
    if have is not None and have > 0 and _tokens(theirs) == past:
        mine.keys = torch.cat([mine.keys, theirs.keys[..., have:past, :]], dim=-2)
        mine.values = torch.cat([mine.values, theirs.values[..., have:past, :]], dim=-2)
    else:
        cache.layers[slot] = copy.deepcopy(theirs)
    seen[slot] = past


__all__ = ["LoopBlock", "catch_up_slot"]
