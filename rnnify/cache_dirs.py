"""rnnify's on-disk caches, for ``rnnify cache``: what each holds, how big it is, and clearing it.

Every area is derived data that the next run rebuilds (a dequantized GGUF in ~40 s, packed tokens, layer scores),
so clearing one never loses finished work: trained models live in output folders, never here.

A cache folder can be one the user named (``RNNIFY_TOKEN_CACHE=scratch``) and may hold their own files: sizes and
clearing count only the entries rnnify makes there, recognised by their names (and, for packed tokens, the
``key.json`` inside), and the folder itself is never removed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .distill.token_cache import cache_root as token_root
from .errors import RnnifyError
from .sources import cache_root

# What rnnify writes in each area (an atomic write's temporary name is ".<name>.<random>.tmp"; an output folder's
# ".<name>.partial-<random>" or ".<name>.old-<pid>").
_TMP = r"(\..+\.tmp|\..+\.(partial|old)-[\w-]+)"
_ENTRIES = {
    "sources": re.compile(rf"^(digests\.json|.+-[0-9a-f]{{12}}|{_TMP})$"),  # sources.gguf_digest / _dequantized_dir
    "tokens": re.compile(r"^[0-9a-f]{20}$"),  # token_cache.PackedBlocks.dir, holding key.json
    "layer_scores": re.compile(rf"^([0-9a-f]{{24}}\.json|{_TMP})$"),  # layer_select.cached_scores
}


def made_by_rnnify(area: str, entry: Path) -> bool:
    if not _ENTRIES[area].match(entry.name):
        return False
    if area == "tokens":
        return entry.is_dir() and (entry / "key.json").is_file()
    return True


def areas() -> dict[str, tuple[Path, str]]:
    """name -> (folder, what it holds)."""
    return {
        "sources": (cache_root() / "sources", "GGUF checkpoints dequantized to safetensors, one per file content"),
        "tokens": (token_root(), "packed token ids of training texts, per tokenizer and sequence length"),
        "layer_scores": (cache_root() / "layer_scores", "per-layer scores of auto:N layer choices"),
    }


def entries(area: str, path: Path) -> tuple[list[Path], list[Path]]:
    """(rnnify's entries, everything else) at the top of an area's folder."""
    if not path.is_dir():
        return [], []
    items = sorted(path.iterdir())
    ours = [p for p in items if made_by_rnnify(area, p)]
    return ours, [p for p in items if p not in ours]


def entry_bytes(entry: Path) -> int:
    if entry.is_symlink() or entry.is_file():
        return entry.lstat().st_size
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())


def usage() -> list[dict]:
    out = []
    for name, (path, what) in areas().items():
        ours, other = entries(name, path)
        out.append({"area": name, "path": str(path), "bytes": sum(map(entry_bytes, ours)), "entries": len(ours),
                    "other": len(other), "holds": what})
    return out


def clear(names: list[str]) -> list[tuple[str, int]]:
    """Remove rnnify's entries from the named areas ('all' for every one); returns (area, bytes freed, entries
    kept because rnnify did not make them)."""
    known = areas()
    unknown = [n for n in names if n != "all" and n not in known]
    if unknown:
        raise RnnifyError(f"unknown cache area(s) {', '.join(unknown)}; accepted: {', '.join(known)}, all")
    chosen = list(known) if "all" in names else list(dict.fromkeys(names))
    freed = []
    for name in chosen:
        ours, other = entries(name, known[name][0])
        size = 0
        for entry in ours:
            size += entry_bytes(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        freed.append((name, size, len(other)))
    return freed
