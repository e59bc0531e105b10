"""Writing output folders so that an interrupted run never leaves something that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import RnnifyError

# A folder holding any of these is a saved model.
MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def holds_model(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in MODEL_MARKERS)


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RnnifyError(f"output {out} exists and is not a folder; give a new folder path with --out")
    if holds_model(out) and not overwrite:
        raise RnnifyError(f"output folder {out} already holds a model; pass --overwrite or choose another --out")
    if out.is_dir() and any(out.iterdir()) and not holds_model(out) and not overwrite:
        raise RnnifyError(f"output folder {out} is not empty; pass --overwrite or choose another --out")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    On any failure (including Ctrl-C) the temporary folder is removed and ``out`` is left as it was.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
