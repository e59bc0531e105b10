"""Training data through ``datasets``: local text/jsonl/json/parquet files or Hub datasets, tokenised with
the source model's tokenizer and packed into fixed-length blocks."""

from __future__ import annotations

import string
from pathlib import Path

import datasets
import numpy as np
import torch

from ..errors import RnnifyError
from ..paths import resolve_path
from .settings import DataSpec

_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def local_file(spec: DataSpec) -> Path | None:
    """The local file a data spec names (None for a Hub dataset)."""
    path = resolve_path(spec.path)
    if spec.format == "hub":
        return None
    if spec.format != "auto" or Path(path).exists() or Path(path).suffix.lower() in _FORMATS:
        return Path(path)
    return None


def check_data_files(datasets: dict[str, DataSpec]) -> None:
    """Every local data file exists and is not empty (checked by ``rnnify validate`` and before a run loads
    anything); Hub datasets are checked when they load."""
    for key, spec in datasets.items():
        path = local_file(spec)
        if path is None:
            continue
        if not path.is_file():
            raise RnnifyError(f"datasets.{key}: data file {spec.path} does not exist; accepted: a local "
                              ".txt/.jsonl/.json/.parquet file, builtin:..., or a Hub dataset name")
        if path.stat().st_size == 0:
            raise RnnifyError(f"datasets.{key}: data file {spec.path} is empty")


def load_rows(spec: DataSpec):
    """A ``datasets.Dataset`` of raw rows for ``spec``."""
    path = resolve_path(spec.path)
    fmt = spec.format
    if fmt == "auto":
        suffix = Path(path).suffix.lower()
        if suffix in _FORMATS and Path(path).exists():
            fmt = _FORMATS[suffix]
        elif Path(path).exists():
            raise RnnifyError(f"data {spec.path}: cannot tell the format of {suffix or 'a suffix-less file'}; "
                              "set format: text | json | parquet")
        elif suffix in _FORMATS:
            raise RnnifyError(f"data file {spec.path} does not exist")
        else:
            fmt = "hub"
    try:
        if fmt == "hub":
            ds = datasets.load_dataset(path, spec.name, split=spec.split, streaming=spec.streaming)
        else:
            if not Path(path).exists():
                raise RnnifyError(f"data file {spec.path} does not exist")
            if Path(path).stat().st_size == 0:
                raise RnnifyError(f"data file {spec.path} is empty")
            ds = datasets.load_dataset(fmt, data_files=path, split="train", streaming=spec.streaming)
    except RnnifyError:
        raise
    except Exception as e:  # datasets raises many kinds (offline, missing config, bad file)
        cause = e.__cause__ or e.__context__ or e  # DatasetGenerationError wraps the parser's own message
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise RnnifyError(f"data {spec.path}: datasets could not load it as {fmt} ({type(cause).__name__}: "
                          f"{first})") from e
    if spec.template is not None:
        fields = [f for _, f, _, _ in string.Formatter().parse(spec.template) if f]
    else:
        fields = [spec.messages_field or spec.text_field]
    columns = ds.column_names
    if columns is not None:  # streaming datasets may not know their columns up front
        for field in fields:
            if field not in columns:
                raise RnnifyError(f"data {spec.path}: no column {field!r}; columns: {', '.join(columns)}")
    if spec.template is None and not spec.messages_field and getattr(ds, "features", None):
        kind = ds.features.get(spec.text_field)
        if kind is not None and getattr(kind, "dtype", None) not in ("string", "large_string"):
            text_cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
            raise RnnifyError(f"data {spec.path}: text_field {spec.text_field!r} is a column of {kind}, not text; "
                              f"accepted: a text column ({', '.join(text_cols) or 'none here'}), or a template: "
                              "that formats several columns")
    if spec.max_rows is not None:
        ds = ds.take(spec.max_rows) if spec.streaming else ds.select(range(min(spec.max_rows, len(ds))))
    return ds


def _row_text(row: dict, spec: DataSpec, tokenizer) -> str | None:
    """The training text of one row (None: an empty row, skipped)."""
    if spec.messages_field:
        return tokenizer.apply_chat_template(row[spec.messages_field], tokenize=False)
    if spec.template is not None:
        return spec.template.format(**row)
    text = row[spec.text_field]
    if text is not None and not isinstance(text, str):
        raise RnnifyError(f"data {spec.path}: text_field {spec.text_field!r} holds {type(text).__name__} values, not "
                          "text; accepted: a column of strings, or a template: that formats several columns")
    return text if text and text.strip() else None


def pack_stream(spec: DataSpec, tokenizer, seq_len: int, *, skip_rows: int = 0, carry=(), rows_per_batch: int = 256):
    """Tokenise rows (EOS after each document) and cut the token stream into ``seq_len`` blocks, ``rows_per_batch``
    rows at a time: yields ``(blocks [n, seq_len] int64 numpy, rows consumed so far, tokens carried over)`` after each
    batch, so memory stays one batch of rows however large the data. ``skip_rows`` and ``carry`` continue an earlier
    pass exactly where it stopped (the blocks are a pure function of the row stream)."""
    if spec.messages_field and getattr(tokenizer, "chat_template", None) is None:
        raise RnnifyError(f"data {spec.path}: messages_field is set but the tokenizer has no chat template")
    ds = load_rows(spec)
    if skip_rows:
        ds = ds.skip(skip_rows)
    eos = tokenizer.eos_token_id
    buf = np.asarray(list(carry), dtype=np.int64)
    rows = skip_rows
    for batch in ds.iter(batch_size=rows_per_batch):
        n = len(next(iter(batch.values()))) if batch else 0
        texts = [t for t in (_row_text({k: v[i] for k, v in batch.items()}, spec, tokenizer) for i in range(n)) if t]
        rows += n
        pieces = [buf]
        if texts:
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                pieces.append(np.asarray(ids, dtype=np.int64))
                if eos is not None:
                    pieces.append(np.asarray([eos], dtype=np.int64))
        buf = np.concatenate(pieces)
        whole = len(buf) // seq_len * seq_len
        blocks = buf[:whole].reshape(-1, seq_len)
        buf = buf[whole:].copy()
        yield blocks, rows, buf.tolist()


def pack_tokens(spec: DataSpec, tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """All blocks (or the first ``max_blocks``) in memory, for small data (the trainer reads its data through the
    on-disk ``token_cache.PackedBlocks`` instead)."""
    out, n = [], 0
    for blocks, _, _ in pack_stream(spec, tokenizer, seq_len):
        out.append(blocks)
        n += len(blocks)
        if max_blocks is not None and n >= max_blocks:
            break
    if not n:
        raise RnnifyError(f"data {spec.path}: fewer than {seq_len} tokens; lower seq_len or add data")
    return torch.from_numpy(np.concatenate(out)[:max_blocks])
