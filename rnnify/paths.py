"""Where rnnify's shipped files live, and ``builtin:`` paths (a leaf module: imports nothing of rnnify but errors)."""

from __future__ import annotations

from pathlib import Path

from .errors import RnnifyError

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
DATA_DIR = PACKAGE_DIR / "data"
BUILTIN_PREFIX = "builtin:"


def resolve_path(path: str) -> str:
    """``builtin:wikitext-2/valid.txt`` -> the copy shipped inside the package; other paths unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        p = DATA_DIR / path[len(BUILTIN_PREFIX):]
        if not p.exists():
            shipped = ", ".join(sorted(str(x.relative_to(DATA_DIR)) for x in DATA_DIR.rglob("*")
                                       if x.is_file() and x.name != "README.md"))
            raise RnnifyError(f"{path}: no such built-in file; shipped: {shipped}")
        return str(p)
    return path


__all__ = ["BUILTIN_PREFIX", "DATA_DIR", "PACKAGE_DIR", "RECIPES_DIR", "resolve_path"]
