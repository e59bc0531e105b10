"""``auto:N`` and ``auto:P%@L``: a layer budget for measured layer selection, parsed (no weights, no scoring)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RnnifyError

_AUTO = re.compile(r"auto:(?:(?P<n>\d+)|(?P<pct>\d+(?:\.\d+)?)%(?:@(?P<len>\d+))?)")


@dataclass(frozen=True)
class AutoSpec:
    """``auto:N`` (N layers) or ``auto:P%@L`` (a cache at most P% of the teacher's at L tokens; L 4096 by default)."""

    layers: int | None = None
    cache_fraction: float | None = None
    cache_length: int = 4096

    def __str__(self):
        if self.layers is not None:
            return f"auto:{self.layers}"
        return f"auto:{self.cache_fraction * 100:g}%@{self.cache_length}"


def parse_auto(value, label: str | None = None) -> AutoSpec | None:
    """An ``auto:...`` keep-attention value, or None for anything else (an explicit list). ``label`` names the input
    in errors (default: keep-attention '<value>')."""
    if not isinstance(value, str) or not value.strip().startswith("auto"):
        return None
    label = label or f"keep-attention {value!r}"
    m = _AUTO.fullmatch(value.strip())
    if not m:
        raise RnnifyError(f"{label}: accepted auto forms are auto:N (N layers chosen by measurement) "
                          "and auto:P%@L (the cache at most P% of the teacher's at L tokens), e.g. auto:4, auto:10%@4096")
    if m.group("n") is not None:
        return AutoSpec(layers=int(m.group("n")))
    pct = float(m.group("pct"))
    if not 0 < pct <= 100:
        raise RnnifyError(f"{label}: the cache budget must be in (0, 100]%")
    length = int(m.group("len") or 4096)
    if length < 1:
        raise RnnifyError(f"{label}: the cache is measured at L tokens; accepted: L >= 1 (the P%@L part of "
                          "auto:10%@4096)")
    return AutoSpec(cache_fraction=pct / 100, cache_length=length)


__all__ = ["AutoSpec", "parse_auto"]
