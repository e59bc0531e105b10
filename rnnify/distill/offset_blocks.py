"""The blocks of one packed source read from block ``skip`` on: what a post-training (``conversion.start_from``) reads
when the model it starts from was trained on the first ``skip`` blocks of the same text (``pipeline/data_read.py``).

Block ``j`` of the view is block ``skip + j`` of the source. A finite source that runs out wraps to its start, so the
view is the source rotated (blocks ``skip .. N-1`` first, then ``0 .. skip-1``): the text the earlier training did not
read comes first, and a run longer than what is left reads the rest again rather than a few blocks many times. A
``skip`` past the end (the earlier training read the whole source, perhaps more than once) is taken modulo its length.
A streaming source (size unknown until it ends) is read from block ``skip`` on without wrapping.
"""

from __future__ import annotations

import torch

from .token_cache import block_indices


class OffsetBlocks:
    """A ``PackedBlocks`` seen from block ``skip``, with its interface: ``len()``, ``shape``, ``ensure(n)``,
    ``limit(n)``, ``lazy``, ``complete``, ``seq_len``, ``spec`` and ``blocks[idx]``."""

    def __init__(self, part, skip: int):
        if skip < 0:
            raise ValueError(f"skip {skip}: a block count, 0 or more")
        self.part, self.skip = part, int(skip)
        self.lazy, self.seq_len, self.spec = part.lazy, part.seq_len, part.spec
        self._limit: int | None = None

    @property
    def complete(self) -> bool:
        return self.part.complete

    @property
    def start(self) -> int:
        """The source block this view's block 0 is (``skip`` modulo the source's length once it is all packed)."""
        n = len(self.part)
        return self.skip % n if self.part.complete and n else self.skip

    def _available(self) -> int:
        n = len(self.part)
        return n if self.part.complete else max(0, n - self.skip)  # a complete source wraps: every block is reachable

    def __len__(self) -> int:
        return self._available() if self._limit is None else min(self._limit, self._available())

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    def ensure(self, n: int) -> OffsetBlocks:
        """Pack the source up to this view's first ``n`` blocks (all of it when they wrap past its end)."""
        self.part.ensure(self.skip + n)
        return self

    def limit(self, n: int) -> OffsetBlocks:
        self._limit = n
        return self

    def __getitem__(self, idx) -> torch.Tensor:
        idx = block_indices(idx, len(self))
        j = idx + self.start
        return self.part[j % len(self.part) if self.part.complete else j]

    def describe(self) -> str:
        return f"{self.part.describe()}, read from block {self.start}"


__all__ = ["OffsetBlocks"]
