"""Writing output folders so that an interrupted run never leaves something that looks complete, and nothing a
user put somewhere is ever deleted.

Rules for an output folder (``check_output_dir``):
* a new path, or an empty folder: written;
* a folder holding a saved model: replaced only with ``--overwrite``, and only when it holds nothing but the files
  a saved model consists of (``MODEL_FILES``); anything else in it (notes, other data) makes it a refusal;
* any other non-empty folder, or a file: refused, whatever the flags.
The parent must be a folder we can write in (checked before any weights load).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import RnnifyError

# A folder holding any of these is a saved model.
MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json")

# What transformers' save_pretrained and rnnify write into a model folder (weights, configs, tokenizer files,
# shipped code, card, recipe, metrics, plots). Hidden files (.gitattributes) are part of a model folder too.
MODEL_FILES = (
    "*.json", "*.safetensors", "*.bin", "*.py", "README.md", "recipe.yaml", "metrics.jsonl", "*.png",
    "tokenizer.model", "spiece.model", "vocab.txt", "merges.txt", "*.tiktoken", "*.jinja",
)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that ``path`` holds the old file or the whole new one, never half of it."""
    path = Path(path)
    # a temp name of its own, so two processes writing the same file never write into one temp file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data, **dumps) -> None:
    """``data`` as JSON, written atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, **{"indent": 1, **dumps}) + "\n")


def holds_model(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in MODEL_MARKERS)


def foreign_files(path: Path) -> list[str]:
    """Entries of a model folder that are not part of a saved model (sub-folders count as foreign)."""
    out = []
    for p in sorted(path.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or not any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FILES):
            out.append(p.name + ("/" if p.is_dir() else ""))
    return out


def _writable_parent(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a folder we may write in."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RnnifyError(f"cannot create {out}: {parent} is a file, not a folder; give --out a path under a folder")
    try:  # a real probe: permissions, read-only mounts and special file systems all show here
        shutil.rmtree(tempfile.mkdtemp(prefix=".rnnify-probe-", dir=parent))
    except OSError as e:
        raise RnnifyError(f"cannot write {out}: {parent} does not accept new folders ({e.strerror or e}); choose an "
                          "--out you can write to") from None


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RnnifyError(f"output {out} exists and is not a folder; give a new folder path with --out")
    if out.is_dir() and any(out.iterdir()):
        if not holds_model(out):
            raise RnnifyError(f"output folder {out} is not empty and holds no model; rnnify writes into a new or empty "
                              "folder, or replaces a model folder with --overwrite; choose another --out")
        if not overwrite:
            raise RnnifyError(f"output folder {out} already holds a model; pass --overwrite or choose another --out")
        foreign = foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise RnnifyError(f"--overwrite replaces a model folder, but {out} also holds other files ({shown}); "
                              "move them out or choose another --out")
    _writable_parent(out)
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


def write_model_folder(out: str | os.PathLike, model, tokenizer=None, *, card: str | None = None,
                       files: dict[str, str] | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False,
                       finish=None) -> Path:
    """The one writer of a model folder (convert, run, export, a dequantized source): the weights (sharded past
    ``max_shard_size``), the tokenizer, the model card ``README.md``, further text ``files``, then ``finish(tmp)``
    for what needs the folder (eval plots), all in a temporary folder that replaces ``out`` in one rename."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if card is not None:
            (tmp / "README.md").write_text(card)
        if finish is not None:
            finish(tmp)
    return Path(out)
