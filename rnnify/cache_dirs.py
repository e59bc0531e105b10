"""rnnify's on-disk caches, for ``rnnify cache``: what each holds, how big it is, and clearing it.

Every area is derived data that the next run rebuilds (a dequantized GGUF in ~40 s, packed tokens, layer scores),
so clearing one never loses finished work: trained models live in output folders, never here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import RnnifyError


def areas() -> dict[str, tuple[Path, str]]:
    """name -> (folder, what it holds)."""
    from .distill.token_cache import cache_root as token_root
    from .models import cache_root

    return {
        "sources": (cache_root() / "sources", "GGUF checkpoints dequantized to safetensors, one per file content"),
        "tokens": (token_root(), "packed token ids of training texts, per tokenizer and sequence length"),
        "layer_scores": (cache_root() / "layer_scores", "per-layer scores of auto:N layer choices"),
    }


def folder_bytes(path: Path) -> tuple[int, int]:
    """(bytes, entries) of a folder's files; entries are its top-level items."""
    if not path.is_dir():
        return 0, 0
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total, sum(1 for _ in path.iterdir())


def usage() -> list[dict]:
    out = []
    for name, (path, what) in areas().items():
        size, entries = folder_bytes(path)
        out.append({"area": name, "path": str(path), "bytes": size, "entries": entries, "holds": what})
    return out


def clear(names: list[str]) -> list[tuple[str, int]]:
    """Remove the named areas ('all' for every one); returns (area, bytes freed)."""
    known = areas()
    unknown = [n for n in names if n != "all" and n not in known]
    if unknown:
        raise RnnifyError(f"unknown cache area(s) {', '.join(unknown)}; accepted: {', '.join(known)}, all")
    chosen = list(known) if "all" in names else list(dict.fromkeys(names))
    freed = []
    for name in chosen:
        path = known[name][0]
        size, _ = folder_bytes(path)
        if path.is_dir():
            shutil.rmtree(path)
        freed.append((name, size))
    return freed
