"""Zero-shot tasks through EleutherAI's lm-evaluation-harness (``pip install 'rnnify[eval]'``), the way conversion
papers report them: the harness's own ``HFLM`` wraps the (converted) model object, tasks come from the harness's
registry or from a folder of task YAMLs (``--include-path``, as the harness's own CLI)."""

from __future__ import annotations

from ..errors import RnnifyError

FIND_TASKS = ("list the harness's tasks with `lm-eval ls tasks` (or `python -m lm_eval --tasks list`), or define your "
              "own in YAML files and pass their folder with --include-path DIR")


def _harness():
    try:  # optional: lm-evaluation-harness (pip install 'rnnify[eval]')
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RnnifyError(f"--tasks needs lm-evaluation-harness: pip install 'rnnify[eval]' ({e})") from None
    return lm_eval, HFLM, TaskManager


def task_manager(include_path: str | None = None):
    _, _, TaskManager = _harness()
    return TaskManager(include_path=include_path, verbosity="ERROR")


def check_tasks(tasks: list[str], include_path: str | None = None):
    """The harness's task manager, after checking that it knows every task (one-line error otherwise)."""
    tm = task_manager(include_path)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise RnnifyError(f"lm-evaluation-harness has no task {', '.join(map(repr, unknown))}; {FIND_TASKS}")
    return tm


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
              log=print) -> dict:
    """{task: {metric: value}} for one model (stderr and aliases dropped; 'acc,none' is reported as 'acc')."""
    lm_eval, HFLM, _ = _harness()
    tm = check_tasks(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, backend="causal")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=False,
                                  verbosity="ERROR")
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        kept = {k.split(",")[0]: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
        results[task] = kept
        log(f"{task}: " + ", ".join(f"{k} {v:.3f}" for k, v in kept.items()))
    return results


__all__ = ["FIND_TASKS", "check_tasks", "run_tasks", "task_manager"]
