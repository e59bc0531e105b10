"""Training data through ``datasets``: local text/jsonl/json/parquet files or Hub datasets, tokenised with
the source model's tokenizer and packed into fixed-length blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RnnifyError
from ..recipe import DataSpec, resolve_path

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
    import datasets

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
            ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except RnnifyError:
        raise
    except Exception as e:  # datasets raises many kinds (offline, missing config, bad file)
        cause = e.__cause__ or e.__context__ or e  # DatasetGenerationError wraps the parser's own message
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise RnnifyError(f"data {spec.path}: datasets could not load it as {fmt} ({type(cause).__name__}: "
                          f"{first})") from e
    if spec.template is not None:
        import string

        fields = [f for _, f, _, _ in string.Formatter().parse(spec.template) if f]
    else:
        fields = [spec.messages_field or spec.text_field]
    columns = ds.column_names
    if columns is not None:  # streaming datasets may not know their columns up front
        for field in fields:
            if field not in columns:
                raise RnnifyError(f"data {spec.path}: no column {field!r}; columns: {', '.join(columns)}")
    if spec.max_rows is not None:
        ds = ds.take(spec.max_rows) if spec.streaming else ds.select(range(min(spec.max_rows, len(ds))))
    return ds


def _texts(ds, spec: DataSpec, tokenizer):
    if spec.messages_field:
        if getattr(tokenizer, "chat_template", None) is None:
            raise RnnifyError(f"data {spec.path}: messages_field is set but the tokenizer has no chat template")
        for row in ds:
            yield tokenizer.apply_chat_template(row[spec.messages_field], tokenize=False)
    elif spec.template is not None:
        for row in ds:
            yield spec.template.format(**row)
    else:
        for row in ds:
            text = row[spec.text_field]
            if text and text.strip():
                yield text


def pack_tokens(spec: DataSpec, tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise rows (EOS between documents) and cut the stream into ``[N, seq_len]`` blocks."""
    ds = load_rows(spec)
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    blocks: list[list[int]] = []
    batch: list[str] = []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            if eos is not None:
                buf.append(eos)
        batch.clear()

    for text in _texts(ds, spec, tokenizer):
        batch.append(text)
        if len(batch) >= 256:
            flush()
            while len(buf) >= seq_len:
                blocks.append(buf[:seq_len])
                del buf[:seq_len]
            if max_blocks is not None and len(blocks) >= max_blocks:
                break
    if batch:
        flush()
    while len(buf) >= seq_len and (max_blocks is None or len(blocks) < max_blocks):
        blocks.append(buf[:seq_len])
        del buf[:seq_len]
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if not blocks:
        raise RnnifyError(f"data {spec.path}: fewer than {seq_len} tokens; lower seq_len or add data")
    return torch.tensor(blocks, dtype=torch.int32 if len(tokenizer) < 2**31 else torch.long)


def tokenize_text_file(path: str, tokenizer) -> torch.Tensor:
    """All tokens of a text file as one 1-D stream (for perplexity)."""
    p = Path(resolve_path(path))
    if not p.is_file():
        raise RnnifyError(f"text file {path} does not exist")
    return torch.tensor(tokenizer(p.read_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
