"""``rnnify convert``: convert (or transform) a model and write the result as a model folder, with a record of the
conversion (``rnnify_conversion.json``) and a model card."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, sources
from ..cache_size import cache_bytes
from ..card import model_card
from ..convert import convert, get_method, validate
from ..convert.base import count_new_parameters
from ..convert.method import Transform
from ..io import check_output_dir, write_model_folder
from ..units import parse_bytes


@dataclass
class ConvertedFolder:
    out: Path
    record: dict  # what rnnify_conversion.json holds
    transform: bool  # the method rewrote an rnnify model rather than converting a source
    parameters_added: int  # the conversion's new parameters, or what a transform added
    weight_bytes: int
    seconds: float
    cache: dict  # tokens -> (bytes after, bytes before) per sequence


def convert_to_folder(model: str, method: str, out: str, *, keep_attention=None, options: dict | None = None,
                      attention_fraction=None, attention_every=None, dtype: str | None = "float32",
                      max_shard_size: str = "5GB", overwrite: bool = False, select_text=None, select_mode="restore",
                      select_tokens: int = 4096, log=None) -> ConvertedFolder:
    log = log or (lambda *_: None)
    torch_dtype = sources.parse_dtype(dtype)
    parse_bytes(max_shard_size, "--max-shard-size", bare_bytes=True)
    folder = check_output_dir(out, overwrite)
    t0 = time.time()
    # everything that can be checked from the config fails here, before the weights load
    _, resolved = validate(sources.load_config(model, progress=log), method, keep_attention, options,
                           attention_fraction, attention_every)
    source, tok = sources.load_source(model, dtype="float32", progress=log)
    log(f"loaded {model} in {time.time() - t0:.1f}s")
    t1 = time.time()
    student = convert(source, method, keep_attention=keep_attention, options=options,
                      attention_fraction=attention_fraction, attention_every=attention_every, tokenizer=tok,
                      select_text=select_text, select_mode=select_mode, select_tokens=select_tokens, log=log)
    if torch_dtype is not None:
        student = student.to(torch_dtype)
        student.config.dtype = torch_dtype
    is_transform = isinstance(get_method(method), Transform)
    added = (sum(p.numel() for p in student.parameters()) - sum(p.numel() for p in source.parameters())
             if is_transform else count_new_parameters(student))
    record = {
        "source": model,
        "method": method,
        "options": resolved,
        "keep_attention": [i for i, m in enumerate(getattr(student.config, "layer_mixers", [])) if m == "attention"],
        "program": getattr(student.config, "program", None),
        "dtype": str(next(student.parameters()).dtype).replace("torch.", ""),
        "rnnify_version": __version__,
    }
    write_model_folder(folder, student, tok, max_shard_size=max_shard_size, overwrite=overwrite,
                       files={"rnnify_conversion.json": json.dumps(record, indent=2) + "\n"},
                       card=model_card(student, source=model, recipe={"conversion": record}, name=Path(out).name))
    return ConvertedFolder(
        out=folder, record=record, transform=is_transform, parameters_added=added,
        weight_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")), seconds=time.time() - t1,
        cache={n: (cache_bytes(student, n), cache_bytes(source, n)) for n in (4096, 32768)})


__all__ = ["ConvertedFolder", "convert_to_folder"]
