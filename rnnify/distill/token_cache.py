"""Training tokens packed once into fixed-length blocks in an on-disk cache, read lazily by index.

A cache folder is keyed by what decides its contents: the data source (a local file's path, size and modification
time, or a Hub dataset's name/config/split; the row selection and text fields), the tokenizer (a hash of its full
serialisation, so a cache from another tokenizer is never reused) and ``seq_len``. It holds

- ``blocks.bin``: the blocks so far, row-major, as uint16 when the vocabulary fits (uint32 otherwise);
- ``progress.json``: how many blocks are valid, how many rows they came from, the tokens carried into the next
  block, whether the data is exhausted, and the SHA-256 of the valid bytes of ``blocks.bin``.

A cache is verified when it is opened (``blocks.bin`` at least as long as the recorded blocks, and their bytes
matching the checksum): one that does not verify (zeroed, truncated, edited) is packed again, with a message, never
trained on.

Packing appends a batch of rows at a time and then updates ``progress.json`` by one rename, so memory stays one
batch of rows however large the data, and an interrupted pack continues where it stopped (bytes past the recorded
block count are cut off). A cache is extended when a run needs more blocks than an earlier one packed, and a
streaming dataset is packed as training asks for its blocks (``lazy``). A file lock serialises packing between
processes (several ranks, or two runs sharing the cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import RnnifyError
from ..io import write_json_atomic
from ..paths import resolve_path
from ..sources import cache_root as rnnify_cache
from .data import local_file, pack_stream
from .settings import DataSpec

CACHE_ENV = "RNNIFY_TOKEN_CACHE"
_FORMAT = 2  # 2: progress.json carries the checksum of blocks.bin
_HASH_CHUNK = 1 << 24


def _prefix_hash(path: Path, nbytes: int):
    """A running SHA-256 of the first ``nbytes`` of ``path`` (None when the file is shorter)."""
    h = hashlib.sha256()
    if nbytes == 0:
        return h
    try:
        with open(path, "rb") as f:
            left = nbytes
            while left:
                chunk = f.read(min(left, _HASH_CHUNK))
                if not chunk:
                    return None
                h.update(chunk)
                left -= len(chunk)
    except FileNotFoundError:
        return None
    return h


def cache_root() -> Path:
    """Where packed tokens live: ``$RNNIFY_TOKEN_CACHE``, else ``tokens/`` in rnnify's cache (``$RNNIFY_CACHE``,
    default ``~/.cache/rnnify``)."""
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else rnnify_cache() / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the fast tokenizer's full serialisation (vocabulary, merges,
    normaliser, pre-tokeniser), else the class and vocabulary; the EOS id and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"eos={tokenizer.eos_token_id}".encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def data_fingerprint(spec: DataSpec) -> dict:
    """The data source as it stands: a local file's resolved path, size and mtime (an edited file is a new source);
    a Hub dataset's name, config, split and streaming mode; the rows and fields taken."""
    d = spec.model_dump()
    path = local_file(spec)
    if path is not None:
        st = Path(path).stat()
        d.update(path=str(Path(path).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
    else:
        d["path"] = resolve_path(spec.path)
    return d


def block_indices(idx, n: int) -> torch.Tensor:
    """``idx`` (an int, a list or a tensor) as a flat long tensor of block numbers, each checked to be in ``0..n-1``:
    the one bounds check of every blocks view (``PackedBlocks``, ``MixedBlocks``, ``OffsetBlocks``)."""
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"block index out of range 0..{n - 1}")
    return idx


class PackedBlocks:
    """The ``[N, seq_len]`` token blocks of one data source, on disk. ``len()`` is the number packed so far;
    ``ensure(n)`` packs until there are ``n`` (or the data ends); ``blocks[idx]`` reads rows as int64."""

    def __init__(self, spec: DataSpec, tokenizer, seq_len: int, *, root: Path | None = None, log=print):
        self.spec, self.tokenizer, self.seq_len, self.log = spec, tokenizer, int(seq_len), log
        self.lazy = bool(spec.streaming)  # a streaming source is packed as training reaches its blocks
        key = {"format": _FORMAT, "data": data_fingerprint(spec), "tokenizer": tokenizer_fingerprint(tokenizer),
               "seq_len": self.seq_len}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.dir = Path(root or cache_root()) / digest
        self.dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        self.key = key
        self._mm = None
        self._limit: int | None = None
        self._stream = None  # [the open packing generator, the block count it has reached] (lazy packing)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RnnifyError(f"token cache {self.dir} cannot be created ({e.strerror}); set {CACHE_ENV} to a "
                              "writable folder") from None
        meta = self.dir / "key.json"
        if not meta.exists():
            meta.write_text(json.dumps(key, indent=2, default=str) + "\n")
        with self._lock():
            self._progress = self._read_progress()
            self._hasher = (self._progress["blocks"], self._verified_hash(self._progress))

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def data_file(self) -> Path:
        return self.dir / "blocks.bin"

    def _read_progress(self) -> dict:
        try:
            p = json.loads((self.dir / "progress.json").read_text())
            if p.get("seq_len") == self.seq_len and p.get("dtype") == np.dtype(self.dtype).name:
                return p
        except (OSError, ValueError):
            pass
        return self._fresh_progress()

    def _fresh_progress(self) -> dict:
        return {"blocks": 0, "rows": 0, "carry": [], "complete": False, "seq_len": self.seq_len,
                "dtype": np.dtype(self.dtype).name, "sha256": hashlib.sha256().hexdigest()}

    def _verified_hash(self, p: dict):
        """The running hash of the recorded blocks when ``blocks.bin`` verifies against ``p``; otherwise the cache
        is reset (said in one line) and packing starts again from the first row. Call with the lock held."""
        nbytes = p["blocks"] * self.seq_len * np.dtype(self.dtype).itemsize
        h = _prefix_hash(self.data_file, nbytes)
        if h is not None and (nbytes == 0 or h.hexdigest() == p.get("sha256")):
            return h
        size = self.data_file.stat().st_size if self.data_file.exists() else 0
        why = (f"blocks.bin holds {size:,} bytes, {nbytes:,} recorded" if h is None
               else "blocks.bin does not match its checksum")
        self.log(f"token cache {self.dir}: {why}; packing {self.spec.path} again")
        fresh = self._fresh_progress()
        with open(self.data_file, "wb"):
            pass
        self._write_progress(fresh)
        p.clear()
        p.update(fresh)
        self._stream = None
        return hashlib.sha256()

    def _write_progress(self, p: dict) -> None:
        write_json_atomic(self.dir / "progress.json", p, indent=None)

    @property
    def complete(self) -> bool:
        return bool(self._progress["complete"])

    def __len__(self) -> int:
        n = self._progress["blocks"]
        return n if self._limit is None else min(n, self._limit)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    def limit(self, n: int) -> PackedBlocks:
        """Use only the first ``n`` blocks (a run's share of a larger cache: the same blocks as a run that packed
        exactly ``n``)."""
        self._limit = n
        return self

    # ---- packing -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        with open(self.dir / "lock", "a+") as f:
            try:  # optional: fcntl is POSIX-only
                import fcntl

                fcntl.flock(f, fcntl.LOCK_EX)
            except ImportError:  # no advisory locks (Windows): one process packs at a time by convention
                pass
            yield

    def ensure(self, n: int) -> PackedBlocks:
        """Pack until at least ``n`` blocks are on disk or the data is exhausted."""
        if self._progress["blocks"] >= n or self.complete:
            return self
        with self._lock():
            self._progress = p = self._read_progress()  # another process may have packed meanwhile
            if p["blocks"] >= n or p["complete"]:
                self._mm = None
                return self
            # the running hash this process holds, if it is at the recorded count; else read and verify the file
            h = self._hasher[1] if self._hasher[0] == p["blocks"] else self._verified_hash(p)
            item = np.dtype(self.dtype).itemsize
            with open(self.data_file, "ab") as f:
                f.truncate(p["blocks"] * self.seq_len * item)  # bytes of an interrupted pack past the last record
            first, t0, announced = p["blocks"], time.time(), False
            if self._stream is None or self._stream[1] != p["blocks"]:  # (re)open the rows where the cache stops
                self._stream = [pack_stream(self.spec, self.tokenizer, self.seq_len, skip_rows=p["rows"],
                                            carry=p["carry"]), p["blocks"]]
            with open(self.data_file, "ab") as f:
                for blocks, rows, carry in self._stream[0]:
                    if len(blocks):
                        data = blocks.astype(self.dtype).tobytes()
                        f.write(data)
                        f.flush()
                        h.update(data)
                    p = {**p, "blocks": p["blocks"] + len(blocks), "rows": rows, "carry": carry,
                         "sha256": h.hexdigest()}
                    self._write_progress(p)
                    self._stream[1] = p["blocks"]
                    if not announced and time.time() - t0 > 10:
                        self.log(f"packing {self.spec.path} into {self.seq_len}-token blocks ({self.dir}) ...")
                        announced = True
                    if p["blocks"] >= n:
                        break
                else:
                    p = {**p, "complete": True, "carry": []}
                    self._write_progress(p)
                    self._stream = None
            self._progress, self._mm, self._hasher = p, None, (p["blocks"], h)
            if p["blocks"] > first and not self.lazy:
                self.log(f"packed {p['blocks'] - first:,} blocks of {self.seq_len} tokens from {self.spec.path} in "
                         f"{time.time() - t0:.1f}s (token cache {self.dir})")
        if not self._progress["blocks"]:
            raise RnnifyError(f"data {self.spec.path}: fewer than {self.seq_len} tokens; lower seq_len or add data")
        return self

    # ---- reading -------------------------------------------------------------------------------------------
    def __getitem__(self, idx) -> torch.Tensor:
        idx = block_indices(idx, len(self))
        if self._mm is None or self._mm.shape[0] < self._progress["blocks"]:
            self._mm = np.memmap(self.data_file, dtype=self.dtype, mode="r",
                                 shape=(self._progress["blocks"], self.seq_len))
        return torch.from_numpy(self._mm[idx.numpy()].astype(np.int64))

    def describe(self) -> str:
        state = "complete" if self.complete else f"{self._progress['rows']:,} rows read so far"
        return f"{len(self):,} blocks of {self.seq_len} tokens ({state}; token cache {self.dir})"


__all__ = ["CACHE_ENV", "PackedBlocks", "block_indices", "cache_root", "data_fingerprint", "tokenizer_fingerprint"]
