"""``rnnify select-layers``: score every layer of a source for a method, choose the kept layers for a budget, and
write the scores (``layer_scores.json``) and their chart (``layer_scores.png``)."""

from __future__ import annotations

from pathlib import Path

from .. import sources
from ..convert import validate
from ..convert.auto_spec import AutoSpec
from ..convert.layer_select import cached_scores, keep_for_budget, plan_cache_bytes, teacher_cache_bytes
from ..errors import RnnifyError
from ..eval.plots import bar_chart
from ..io import write_json_atomic


def select_layers(model: str, method: str, spec: AutoSpec, out: str, *, options: dict | None = None,
                  text: str = "builtin:wikitext-2/valid.txt", mode: str = "restore", tokens: int = 4096,
                  seq_len: int | None = None, log=None) -> dict:
    """Score, choose and write; returns the record written to ``layer_scores.json`` (scores, kept layers, and the
    cache at 4k, 32k and the budget's length against the teacher's)."""
    log = log or (lambda *_: None)
    _, opts = validate(sources.load_config(model, progress=log), method, str(spec), options)
    teacher, tok = sources.load_source(model, progress=log)
    if tok is None:
        raise RnnifyError(f"{model}: no tokenizer found; scoring layers needs one to read --text")
    scores, student = cached_scores(teacher, method, opts, tok, text, mode, tokens, seq_len, log=log)
    lengths = sorted({4096, 32768, spec.cache_length})
    t_cache = {n: teacher_cache_bytes(teacher, n) for n in lengths}
    keep = keep_for_budget(scores, spec, student, t_cache[spec.cache_length])
    cache = {n: plan_cache_bytes(student, keep, n) for n in lengths}
    record = {"source": model, "method": method, "options": opts, "mode": mode, "text": text, "tokens": tokens,
              "budget": str(spec), "scores": scores, "keep_attention": keep,
              "cache_bytes": {str(n): cache[n] for n in lengths},
              "teacher_cache_bytes": {str(n): t_cache[n] for n in lengths}}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "layer_scores.json", record, indent=2)
    bar_chart(folder / "layer_scores.png", [str(i) for i in range(len(scores))], scores, highlight=keep,
              title=f"{model} {method}: layer scores ({mode})", xlabel="layer", ylabel="KL change")
    return record


__all__ = ["select_layers"]
