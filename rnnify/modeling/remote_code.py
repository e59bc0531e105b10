"""Which files a saved model ships for ``trust_remote_code=True``: derived, never listed by hand.

The modeling and configuration files plus every sibling file they import relatively, followed the way
transformers follows them when it loads remote code (``from .x import`` / ``import .x`` lines, even inside
``try``). ``.kernels_reference`` is rnnify's ``kernels/reference.py``, shipped under that name.

Only the standard library is imported: this file ships with converted models.
"""

from __future__ import annotations

import re
from pathlib import Path

ENTRY_POINTS = ("configuration_rnnify.py", "modeling_rnnify.py")
_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+)\s*$)", re.MULTILINE)


def _source(here: Path, module: str) -> Path:
    local = here / f"{module}.py"
    if local.exists() or module != "kernels_reference":
        return local
    return here.parent / "kernels" / "reference.py"  # inside the rnnify package


def remote_code_sources() -> dict[str, Path]:
    """File name in the saved folder -> the file to copy there."""
    here = Path(__file__).resolve().parent
    files: dict[str, Path] = {}
    todo = [name[:-3] for name in ENTRY_POINTS]
    while todo:
        module = todo.pop()
        if f"{module}.py" in files:
            continue
        path = _source(here, module)
        if not path.is_file():
            raise FileNotFoundError(f"remote code: {module}.py is imported but {path} does not exist")
        files[f"{module}.py"] = path
        todo += [a or b for a, b in _IMPORT.findall(path.read_text())]
    return dict(sorted(files.items()))


__all__ = ["remote_code_sources"]
