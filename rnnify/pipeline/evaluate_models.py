"""``rnnify eval``: load one or more models (and a teacher), evaluate them side by side by an ``EvalSpec``, and
write ``eval.json``, the plots and the model card's Evaluation section where asked."""

from __future__ import annotations

from pathlib import Path

from .. import sources
from ..errors import RnnifyError
from ..eval.harness import check_tasks
from ..eval.report import evaluate, write_eval
from ..eval.spec import EvalSpec
from ..paths import resolve_path


def evaluate_models(names: list[str], spec: EvalSpec, *, teacher: str | None = None, out: str | None = None,
                    log=None) -> dict:
    """The results of ``evaluate`` for the models ``names`` (labelled ``student`` when alone, else by folder name).
    They are written to ``out``, or to the model's own folder when there is one model and it is a folder."""
    log = log or (lambda *_: None)
    for text in spec.texts:
        if not Path(resolve_path(text)).is_file():
            raise RnnifyError(f"--text {text}: no such file; accepted: a text file or builtin:wikitext-2/test.txt")
    if spec.include_path and not Path(spec.include_path).is_dir():
        raise RnnifyError(f"--include-path {spec.include_path}: not a folder (of lm-evaluation-harness task YAMLs)")
    if spec.tasks:  # an unknown task fails before any model loads
        check_tasks(spec.tasks, spec.include_path)
    students, tok = {}, None
    for i, name in enumerate(names):
        model, t = sources.load_source(name, dtype="float32", progress=log)
        if t is None:
            raise RnnifyError(f"{name} has no tokenizer files; save one next to the model")
        tok = tok or t
        label = "student" if len(names) == 1 else (Path(name).name or name)
        students[label if label not in students else f"{label}-{i}"] = model
    teacher_model = sources.load_source(teacher, dtype="float32", progress=log)[0] if teacher else None
    results = evaluate(students, tok, spec, teacher=teacher_model, log=log)
    if out is not None or (len(names) == 1 and Path(names[0]).is_dir()):
        folder = Path(out or names[0])
        folder.mkdir(parents=True, exist_ok=True)
        plots = write_eval(folder, results)
        log(f"wrote {folder / 'eval.json'}, the README's Evaluation section" + (f" and {', '.join(plots)}" if plots
                                                                                 else ""))
    return results


__all__ = ["evaluate_models"]
