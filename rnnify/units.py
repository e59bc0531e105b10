"""Byte sizes: the one parser and the one formatter (a leaf module).

Units are spelled out: KB, MB, GB, TB are powers of 1000 (as transformers reads ``max_shard_size``, and as disks
are sold); KiB, MiB, GiB, TiB are powers of 1024. Sizes are printed in binary units.
"""

from __future__ import annotations

import re

from .errors import RnnifyError

_FACTORS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_UNITS = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")  # as the error message spells them
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


def parse_bytes(text, what: str = "size", bare_bytes: bool = False) -> int:
    """``80GiB``, ``80 GB``, ``512MiB``, ``5GB`` -> bytes (a bare integer is bytes only when ``bare_bytes``)."""
    if bare_bytes and (isinstance(text, int) or str(text).strip().isdigit()):
        n = int(text)
    else:
        m = _SIZE.fullmatch(str(text))
        unit = m.group(2).upper() if m else ""
        if not m or unit not in _FACTORS:
            raise RnnifyError(f"{what} {text!r} is not a size; accepted: a number and a unit ({', '.join(_UNITS)}; "
                              "KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024), e.g. 80GiB or 5GB")
        n = int(float(m.group(1)) * _FACTORS[unit])
    if n <= 0:
        raise RnnifyError(f"{what} {text!r}: accepted: a size above zero")
    return n


def human_bytes(n: float, digits: int = 1) -> str:
    """Bytes in the largest binary unit below 1024 of it, e.g. ``1.5 GiB``, ``300.0 MiB``, ``12 B``."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.{digits}f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.{digits}f} GiB"


__all__ = ["human_bytes", "parse_bytes"]
