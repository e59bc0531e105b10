"""A weighted mixture of packed data sources, read like one: ``data: {mix: 0.8, wikitext: 0.2}`` in a stage (or in
``train:``) trains on 80% blocks of ``mix`` and 20% of ``wikitext``.

The mixture's block ``j`` is fixed by the weights alone, so a run is deterministic and resumes to the same order: the
``k``-th block of source ``s`` sits at the key ``(k + 1/2) / w_s`` and the mixture is every source's blocks in the
order of their keys (an even interleave: among the first ``n`` blocks each source has ``w_s n`` of them, within one).
The trainer then shuffles the mixture's blocks per epoch as it shuffles one source's. A finite source that runs out
before its share is read again from its start (it is upsampled; the log says so).
"""

from __future__ import annotations

import math

import torch

from ..errors import RnnifyError
from .token_cache import block_indices


def interleave(weights: list[float], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, occurrence) of the mixture's first ``n`` blocks for normalised ``weights``."""
    sources, occurrences, keys = [], [], []
    for s, w in enumerate(weights):
        k = torch.arange(math.ceil(w * n) + 1, dtype=torch.float64)
        keys.append((k + 0.5) / w)
        sources.append(torch.full_like(k, s, dtype=torch.long))
        occurrences.append(k.long())
    order = torch.argsort(torch.cat(keys), stable=True)[:n]
    return torch.cat(sources)[order], torch.cat(occurrences)[order]


class MixedBlocks:
    """The blocks of several ``PackedBlocks`` in the proportions of ``weights``, with their interface: ``len()``,
    ``shape``, ``ensure(n)``, ``limit(n)``, ``lazy`` and ``blocks[idx]``."""

    def __init__(self, parts: list, weights: list[float], names: list[str], log=print):
        if len(parts) != len(weights) or not parts:
            raise ValueError("a mixture needs one weight per source")
        if any(w <= 0 for w in weights):
            raise RnnifyError(f"data weights {dict(zip(names, weights))}: accepted: numbers above zero")
        total = sum(weights)
        self.parts, self.names, self.log = parts, names, log
        self.weights = [w / total for w in weights]
        self.seq_len = parts[0].seq_len
        self.lazy = any(p.lazy for p in parts)
        self._n = 0
        self._schedule = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        self._upsampled: set[str] = set()

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self.seq_len)

    def _plan(self, n: int) -> None:
        """The schedule of at least ``n`` blocks (prefixes agree, so a longer one serves every shorter request; it is
        grown by doubling, as a streaming run asks for a few more blocks at every step)."""
        if n > len(self._schedule[0]):
            source, occurrence = interleave(self.weights, max(n, 2 * len(self._schedule[0])))
            self._schedule = (source, occurrence)
            self._counts = torch.nn.functional.one_hot(source, len(self.parts)).cumsum(0)  # blocks per source so far

    def ensure(self, n: int) -> MixedBlocks:
        """Pack each source up to its share of the first ``n`` blocks (or until it ends)."""
        self._plan(n)
        need = self._counts[n - 1].tolist() if n else [0] * len(self.parts)
        for s, part in enumerate(self.parts):
            if need[s]:
                part.ensure(need[s])
                if len(part) < need[s] and part.complete and self.names[s] not in self._upsampled:
                    self._upsampled.add(self.names[s])
                    self.log(f"data {self.names[s]}: {len(part):,} blocks, fewer than its share of {need[s]:,}; read "
                             "again from its start (upsampled)")
        self._n = n
        return self

    def limit(self, n: int) -> MixedBlocks:
        if n != self._n:
            self.ensure(n)
        return self

    def __getitem__(self, idx) -> torch.Tensor:
        idx = block_indices(idx, self._n)
        source, occurrence = self._schedule[0][idx], self._schedule[1][idx]
        out = torch.empty(len(idx), self.seq_len, dtype=torch.long)
        for s, part in enumerate(self.parts):
            rows = (source == s).nonzero().flatten()
            if len(rows):
                out[rows] = part[occurrence[rows] % len(part)]
        return out

    def describe(self) -> str:
        return " + ".join(f"{name} {w:.0%}" for name, w in zip(self.names, self.weights))


__all__ = ["MixedBlocks", "interleave"]
