"""A recipe and its control, run with the same seed, data order, steps and evaluation, judged side by side: what a
transform buys (StateX against the same run without it) or what training buys (a retrofitted model against itself
untrained). ``rnnify run RECIPE --control``.

The control is the recipe with one thing left out (``recipe.control``):

* ``without_transforms``: ``conversion.transforms`` dropped; every stage, the seed and the data stay, so both runs
  read the same blocks in the same order (the default when the recipe has transforms).
* ``untrained``: the stages dropped; the same conversion is evaluated as it starts (the default otherwise). A
  ``select_after`` choice of kept layers is then made on the untrained model.

The control goes to ``<output.dir>-control``; the comparison (``comparison.json`` and ``comparison.md``) is written
there, from the two runs' own ``eval.json`` files: its columns are those runs' students, with the teacher and the
window-only baseline from the run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from ..errors import RnnifyError
from ..eval.recall import paired_difference
from ..eval.report import BASELINE, recurrence_table, results_table
from ..io import write_json_atomic, write_text_atomic
from ..recipe import Recipe, dump_recipe, recipe_from_dict
from .runner import run_recipe


def control_kind(recipe: Recipe) -> str:
    return recipe.control or ("without_transforms" if recipe.conversion.transforms else "untrained")


def control_recipe(recipe: Recipe) -> Recipe:
    """The recipe with the one thing its control leaves out, under its own name and output folder."""
    kind = control_kind(recipe)
    data = yaml.safe_load(dump_recipe(recipe))
    data["name"] = f"{recipe.name}-control"
    data["control"] = None
    data["output"].update(dir=f"{recipe.output.dir.rstrip('/')}-control", run_dir=None)
    data["hub"]["push"] = False
    if kind == "without_transforms":
        data["conversion"]["transforms"] = []
    else:
        data["stages"] = []
        data["conversion"]["select_after"] = None
    return recipe_from_dict(data, f"the control of {recipe.name}")


def _renamed(values: dict, run: str, control: str, control_values: dict) -> dict:
    """A {model: value} row with the run's ``student`` as ``run`` and the control's ``student`` as ``control``."""
    out = {(run if k == "student" else k): v for k, v in values.items()}
    if "student" in control_values:
        out[control] = control_values["student"]
    for key in ("stderr", "per_trial", "cache_bytes"):
        if isinstance(values.get(key), dict):
            out[key] = _renamed(values[key], run, control, control_values.get(key, {}))
    return out


def _same(a, b, what: str) -> None:
    if a is None or b is None or abs(a - b) > 1e-6 * max(1.0, abs(a)):
        raise RnnifyError(f"the run and its control were not judged alike: {what} is {a} in one and {b} in the other "
                          "(rerun both with the same eval section)")


def compare(run_eval: dict, control_eval: dict, run_name: str, control_name: str) -> dict:
    """One eval result with the two runs' students as columns (``run_name``, ``control_name``). The teacher and the
    window baseline come from the run; the control's teacher must have measured the same (same texts, windows)."""
    if not run_eval or not control_eval:
        raise RnnifyError("--control compares the two runs' evaluations: the recipe needs an eval: section")
    out = copy.deepcopy(run_eval)
    cols = run_eval.get("columns", ["teacher", "student", BASELINE])
    out["columns"] = [c for name in cols for c in ((run_name, control_name) if name == "student" else (name,))]
    out["students"] = [run_name, control_name]

    def ppl_row(row: dict, control_row: dict) -> dict:
        if "teacher" in row:
            _same(row["teacher"], control_row.get("teacher"), f"the teacher's perplexity on {row.get('text')}")
        merged = _renamed({k: v for k, v in row.items() if k not in ("recovered", "gap_recovered")}, run_name,
                          control_name, control_row)
        if "teacher" in row and BASELINE in row:  # both against the run's baseline (the same kept layers)
            gap = row[BASELINE] - row["teacher"]
            merged["recovered"] = {n: (row[BASELINE] - merged[n]) / gap if gap > 0 else None
                                   for n in (run_name, control_name)}
            merged["gap_recovered"] = merged["recovered"][run_name]
        return merged

    out["perplexity"] = ppl_row(run_eval["perplexity"], control_eval["perplexity"])
    for key in ("perplexity_by_text", "perplexity_by_context"):
        if key in run_eval:
            out[key] = {k: ppl_row(v, control_eval.get(key, {}).get(k, {})) for k, v in run_eval[key].items()}
    for key in ("mqar", "passkey", "speed", "passkey_by_depth"):
        out[key] = {k: _renamed(v, run_name, control_name, control_eval.get(key, {}).get(k, {}))
                    for k, v in run_eval.get(key, {}).items()}
    for row in out["mqar"].values():  # both runs answered the same prompts (same seed): the difference, paired
        trials = row.get("per_trial", {})
        if len(trials.get(run_name, [])) == len(trials.get(control_name, [])) > 0:
            row["paired_difference"] = paired_difference(trials[run_name], trials[control_name])
    out["agreement"] = _renamed(run_eval.get("agreement", {}), run_name, control_name,
                                control_eval.get("agreement", {}))
    out["loss_by_position"] = _renamed(run_eval.get("loss_by_position", {}), run_name, control_name,
                                       control_eval.get("loss_by_position", {}))
    if "tasks" in run_eval:
        out["tasks"] = {t: {m: _renamed(v, run_name, control_name, control_eval.get("tasks", {}).get(t, {}).get(m, {}))
                            for m, v in ms.items()} for t, ms in run_eval["tasks"].items()}
    out["looped"] = {n: r for n, r in ((run_name, run_eval), (control_name, control_eval)) if r.get("recurrence")}
    for key in ("recurrence", "recurrence_by_text", "recurrence_teacher"):
        out.pop(key, None)  # per model now, under "looped"
    return out


def comparison_table(merged: dict) -> str:
    text = results_table(merged)
    looped = merged.get("looped") or {}
    if looped:
        text += "\n" + recurrence_table(next(iter(looped.values())), looped)
    return text


def run_with_control(recipe: Recipe, *, resume: bool = False, fresh: bool = False, progress: bool = True,
                     log=print) -> dict:
    """Run ``recipe`` and its control (each resumable on its own), then write and return their comparison."""
    if recipe.eval is None:
        raise RnnifyError(f"{recipe.name}: --control compares the two runs' evaluations; add an eval: section")
    control = control_recipe(recipe)
    log(f"--control ({control_kind(recipe)}): {recipe.name} -> {recipe.output.dir}, then {control.name} -> "
        f"{control.output.dir}")
    for r in (recipe, control):
        summary = run_recipe(r, resume=resume, fresh=fresh, progress=progress)
        if not summary.get("finished"):
            raise RnnifyError(f"{r.name} did not finish; run again with --resume --control")
    evals = [json.loads((Path(r.output.dir) / "eval.json").read_text()) for r in (recipe, control)]
    merged = compare(*evals, recipe.name, control.name)
    merged["runs"] = {recipe.name: recipe.output.dir, control.name: control.output.dir}
    out = Path(control.output.dir)
    write_json_atomic(out / "comparison.json", merged, indent=2)
    table = comparison_table(merged)
    write_text_atomic(out / "comparison.md", f"# {recipe.name} against its control ({control_kind(recipe)})\n\n"
                      f"{table}")
    log(f"comparison written to {out / 'comparison.md'}")
    return merged


__all__ = ["compare", "comparison_table", "control_kind", "control_recipe", "run_with_control"]
