"""Evaluation of one or more students side by side with their teacher and the window-only baseline: eval.json, the
model card table and the plots.

Every measurement is keyed by model name: ``teacher``, each student (``student`` when there is one), and
``window_baseline`` (the teacher with the first student's window + sinks and kept layers, no memory).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..cache_size import cache_bytes
from ..convert import convert
from ..convert.window import METHOD as WINDOW_ONLY
from ..errors import RnnifyError
from ..io import write_json_atomic, write_text_atomic
from ..modeling.mixer_window import WindowMixer
from ..units import human_bytes
from .agreement import continuation_agreement
from .flops import flops_per_token
from .harness import run_tasks
from .passkey import passkey_accuracy
from .perplexity import perplexity, tokenize_text_file, windows
from .plots import write_plots
from .recall import mqar_accuracy, paired_difference
from .spec import EvalSpec
from .speed import decode_speed

BASELINE = "window_baseline"


def window_baseline(student, teacher):
    """The teacher with the student's window + sinks softmax and no memory of older tokens (same kept layers):
    the ``window`` method with the student's settings, or 64 + 4."""
    windowed = [m for _, m in student.mixers() if isinstance(m, WindowMixer)]
    window, sinks = (windowed[0].window, windowed[0].sinks) if windowed else \
        (WindowMixer.SETTINGS["window"], WindowMixer.SETTINGS["sinks"])
    keep = [i for i, m in enumerate(student.config.layer_mixers) if m == "attention"]
    base = convert(teacher, WINDOW_ONLY.name, keep_attention=keep, options={"window": window, "sinks": sinks})
    return base, f"window {window} + {sinks} sinks"


def _has_mixers(model) -> bool:
    return bool(getattr(model, "mixers", None) and model.mixers())


def _perplexity_row(models, names, tokens, text, L, num_windows, log, curves=None, argmax=None) -> dict:
    """Perplexity of every model on ``num_windows`` windows of ``L`` tokens of ``text``, and the share of the gap
    between the window-only baseline and the teacher that each student recovers. ``curves`` (when given) gets the
    loss by position and ``argmax`` the greedy tokens (for agreement)."""
    blocks = windows(tokens, L, num_windows)
    row = {}
    for name, m in models.items():
        r = perplexity(m, blocks, details=curves is not None)
        row[name] = r["ppl"]
        log(f"perplexity @ {L} on {text}: {name} {r['ppl']:.2f}")
        if curves is not None:
            bins = r["position_nll"].view(-1)[: (L - 1) // 32 * 32].view(-1, 32).mean(-1)
            curves[name] = [round(float(v), 4) for v in bins]
            argmax[name] = r["argmax"]
    row.update({"text": text, "windows": int(blocks.shape[0]), "tokens": int(blocks[:, 1:].numel())})
    if "teacher" in row and BASELINE in row:
        gap = row[BASELINE] - row["teacher"]
        row["recovered"] = {n: (row[BASELINE] - row[n]) / gap if gap > 0 else None for n in names}
        row["gap_recovered"] = row["recovered"][names[0]]
    return row


def evaluate(students, tokenizer, spec: EvalSpec, teacher=None, log=print) -> dict:
    """``students``: a model, or {name: model} for several side by side (the first names the window baseline)."""
    if not isinstance(students, dict):
        students = {"student": students}
    names = list(students)
    first = students[names[0]]
    lengths = spec.context_lengths
    results: dict = {"context_length": lengths[0], "students": names}
    models = {}
    if teacher is not None and spec.teacher:
        models["teacher"] = teacher
    models.update(students)
    if teacher is not None and spec.baseline and _has_mixers(first):
        base, label = window_baseline(first, teacher)
        models[BASELINE] = base
        results["baseline"] = label
    results["columns"] = list(models)

    t0 = time.time()
    for text in spec.missing_optional_texts:
        log(f"perplexity: {text} is not here; measured without it (optional_text)")
    by_context, curves, argmax, by_text, tokens_of = {}, {}, {}, {}, {}
    for i, text in enumerate(spec.texts):  # the first text is the one the other measurements read
        text_tokens = tokens_of[text] = tokenize_text_file(text, tokenizer)
        if i == 0:
            tokens = text_tokens
        for L in (lengths if i == 0 else lengths[:1]):
            row = _perplexity_row(models, names, text_tokens, text, L, spec.num_windows, log,
                                  curves if i == 0 and L == lengths[0] else None, argmax)
            if i == 0:
                by_context[str(L)] = row
            if L == lengths[0]:
                by_text[text] = row
    results["perplexity"] = by_context[str(lengths[0])]
    if len(by_text) > 1:
        results["perplexity_by_text"] = by_text
    if len(lengths) > 1:
        results["perplexity_by_context"] = by_context
    results["loss_by_position"] = {"bin": 32, **curves}

    if "teacher" in models:
        results["agreement"] = {n: {"next_token": float((argmax[n] == argmax["teacher"]).float().mean())}
                                for n in models if n != "teacher"}
        if spec.continuations:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
            for n in models:
                if n != "teacher":
                    r = continuation_agreement(models[n], teacher, tokens, spec.continuations,
                                               min(256, tokens.numel() // 2), spec.continuation_tokens, pad)
                    results["agreement"][n]["continuation"] = r
                    log(f"agreement with the teacher: {n} next token {results['agreement'][n]['next_token']:.1%}, "
                        f"{r['new_tokens']}-token continuations identical {r['identical']:.0%}")

    looped = [n for n in names if len(getattr(students[n], "blocks", []))]
    if spec.recurrence and looped:
        student = students[looped[0]]
        by_text = {}
        for text in spec.texts:  # every text: depth must help on each kind, not only the first
            blocks = windows(tokens_of[text], lengths[0], spec.num_windows)
            by_text[text] = {}
            for r in spec.recurrence:
                ppl = perplexity(student, blocks, recurrence=r)["ppl"]
                flops = flops_per_token(student, lengths[0], recurrence=r)
                by_text[text][str(r)] = {"ppl": ppl, "flops_per_token": flops}
                log(f"perplexity @ {lengths[0]} on {text} with {r} loops: {ppl:.2f} ({flops / 1e6:.0f} MFLOPs/token)")
        results["recurrence"] = by_text[spec.texts[0]]
        if len(by_text) > 1:
            results["recurrence_by_text"] = by_text
        if "teacher" in models:
            results["recurrence_teacher"] = {"ppl": results["perplexity"]["teacher"],
                                             "flops_per_token": flops_per_token(teacher, lengths[0])}
    elif spec.recurrence:
        raise RnnifyError("--recurrence: the model has no recurrent block (convert with --method retrofit)")

    measured = [n for n in models if n != BASELINE]
    if spec.mqar_pairs:
        results["mqar"] = {}
        for n in spec.mqar_pairs:
            row = {}
            for name in measured:
                r = mqar_accuracy(models[name], tokenizer, n, trials=spec.mqar_trials, seed=spec.mqar_seed)
                row[name] = r["accuracy"]
                row.setdefault("stderr", {})[name] = r["stderr"]
                row.setdefault("per_trial", {})[name] = r["per_trial"]  # the same prompts for every model: pairable
                row["prompt_tokens"] = r["prompt_tokens"]
                log(f"MQAR @ {n} pairs ({r['prompt_tokens']} tokens): {name} {r['accuracy']:.0%}")
            row["cache_bytes"] = {name: cache_bytes(models[name], row["prompt_tokens"]) for name in measured}
            if len(names) == 2:  # two models on the same prompts: their difference, paired trial by trial
                row["paired_difference"] = paired_difference(row["per_trial"][names[0]], row["per_trial"][names[1]])
            results["mqar"][str(n)] = row
        results["mqar_seed"] = spec.mqar_seed

    results["passkey"], results["passkey_by_depth"] = {}, {}
    for length in spec.passkey_lengths:
        # the window baseline too: with no layer kept it cannot see a key that left its window, but kept attention
        # layers can, and a student's recall counts only where it is above the baseline's
        for name in models:
            r = passkey_accuracy(models[name], tokenizer, length, spec.passkey_trials)
            results["passkey"].setdefault(str(length), {})[name] = r["accuracy"]
            results["passkey"][str(length)].setdefault("stderr", {})[name] = r["stderr"]
            results["passkey_by_depth"].setdefault(str(length), {})[name] = r["by_depth"]
            log(f"passkey @ {length}: {name} {r['accuracy']:.0%}")

    results["speed"] = {}
    for length in spec.speed_lengths:
        for name in measured:
            r = decode_speed(models[name], length, spec.speed_new_tokens)
            results["speed"].setdefault(str(length), {})[name] = {
                "decode_tokens_per_s": r["decode_tokens_per_s"], "step_ms_median": r["step_ms_median"],
                "cache_bytes": r["cache_bytes"], "cache_tokens": r["cache_tokens"]}
            speed = "could not be measured" if r["decode_tokens_per_s"] is None else \
                f"{r['decode_tokens_per_s']:.1f} tok/s (median of {r['timed_steps']} steps)"
            log(f"decode @ {length}: {name} {speed}, cache {human_bytes(r['cache_bytes'])}")

    if spec.tasks:
        results["tasks"] = {}
        for name in measured:
            for task, metrics in run_tasks(models[name], tokenizer, spec.tasks, spec.include_path, spec.task_limit,
                                           log=log).items():
                for metric, value in metrics.items():
                    results["tasks"].setdefault(task, {}).setdefault(metric, {})[name] = value
    results["seconds"] = round(time.time() - t0, 1)
    return results


# ------------------------------------------------------------------------------------------------ the table
def _label(results, name) -> str:
    return results.get("baseline", "window baseline") if name == BASELINE else name


def results_table(results: dict) -> str:
    """Markdown table: one row per measurement, one column per model (teacher, students, window baseline)."""
    if not results:
        return "_not evaluated_\n"
    p = results["perplexity"]
    cols = results.get("columns") or [c for c in ("teacher", "student", BASELINE)]
    if "columns" not in results:  # an eval.json written before several students: always the three columns
        cols = ["teacher", "student", BASELINE]
    head = " | ".join("window baseline" if c == BASELINE else c for c in cols)
    rows = [f"| measurement | {head} |", "|---" * (len(cols) + 1) + "|"]
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731

    def row(label, values: dict, fmt):
        rows.append(f"| {label} | " + " | ".join(fmt(values.get(c)) for c in cols) + " |")

    short = lambda t: "/".join(str(t).replace("builtin:", "").split("/")[-2:])  # noqa: E731
    for L, q in results.get("perplexity_by_context", {str(results["context_length"]): p}).items():
        row(f"perplexity on {short(p.get('text', 'text'))} @ {L} tokens ({q['windows']} windows)", q, f)
    for t, q in list(results.get("perplexity_by_text", {}).items())[1:]:
        row(f"perplexity on {short(t)} @ {results['context_length']} tokens ({q['windows']} windows)", q, f)
    if len(results.get("perplexity_by_text", {})) > 1:
        for t, q in results["perplexity_by_text"].items():
            if q.get("recovered"):
                row(f"share of the window-to-teacher gap recovered on {short(t)}", q["recovered"], pct)
    def spread(r):  # a share and its standard error over the trials, where the eval recorded one
        err = r.get("stderr", {})
        return lambda name: "—" if r.get(name) is None else pct(r[name]) + (
            f" ±{err[name]:.0%}" if err.get(name) else "")

    def row_of(label, fmt_name):
        rows.append(f"| {label} | " + " | ".join(fmt_name(c) for c in cols) + " |")

    seed = f", prompts of seed {results['mqar_seed']}" if results.get("mqar_seed") else ""
    for n, r in results.get("mqar", {}).items():
        row_of(f"MQAR recall, {n} pairs (~{r['prompt_tokens']} tokens{seed})", spread(r))
    students = results.get("students", [])
    for n, r in results.get("mqar", {}).items():  # two students (a run and its control): the difference, same prompts
        d = r.get("paired_difference")
        if d and len(students) == 2:
            cell = f"{100 * d['mean']:+.1f}% ±{100 * d['stderr']:.1f}"  # a tenth of a point: the gains are a few points
            row_of(f"MQAR, {n} pairs: {students[0]} minus {students[1]}, paired over the same {d['trials']} trials",
                   lambda c, cell=cell: cell if c == students[0] else "—")
    for length, r in results.get("passkey", {}).items():
        row_of(f"passkey accuracy @ {length}", spread(r))
    agree = results.get("agreement", {})
    if agree:
        row("greedy next token = the teacher's", {n: v["next_token"] for n, v in agree.items()}, pct)
        cont = {n: v["continuation"]["identical"] for n, v in agree.items() if "continuation" in v}
        if cont:
            k = next(v["continuation"]["new_tokens"] for v in agree.values() if "continuation" in v)
            row(f"{k}-token greedy continuations = the teacher's", cont, pct)
    for task, metrics in results.get("tasks", {}).items():
        for metric, values in metrics.items():
            row(f"{task} ({metric})", values, lambda v: "—" if v is None else f"{v:.3f}")
    for length, r in results.get("speed", {}).items():
        tok = lambda d: "—" if not d else "not measurable" if d["decode_tokens_per_s"] is None \
            else f"{d['decode_tokens_per_s']:.1f}"  # noqa: E731
        mem = lambda d: "—" if not d else human_bytes(d["cache_bytes"])  # noqa: E731
        row(f"decode tokens/s after {length} (batch 1)", r, tok)
        row(f"cache after {length} tokens", r, mem)
    text = "\n".join(rows) + "\n"
    if results.get("recurrence"):
        text += "\n" + recurrence_table(results)
    recovered = p.get("recovered") or ({"student": p["gap_recovered"]} if p.get("gap_recovered") is not None else {})
    for n, share in recovered.items():
        if share is None:
            continue
        who = "The student" if n == "student" else f"`{n}`"
        if share >= 0:
            text += (f"\n{who} recovers {share:.1%} of the perplexity gap between the window-only baseline "
                     f"({results.get('baseline', '')}) and the teacher.\n")
        else:
            text += (f"\n{who} is behind the window-only baseline ({results.get('baseline', '')}): it has not "
                     "recovered the gap to the teacher yet.\n")
    return text


def recurrence_table(results: dict, models: dict | None = None) -> str:
    """Perplexity by test-time loop count on each text (a looped model), with the source model's and the FLOPs per
    token. ``models``: {column: eval results} to put several looped models side by side (default: this one)."""
    models = models or {"perplexity": results}
    first = next(iter(models.values()))
    texts = first.get("recurrence_by_text") or {first.get("perplexity", {}).get("text", "text"): first["recurrence"]}
    short = lambda t: "/".join(str(t).replace("builtin:", "").split("/")[-2:])  # noqa: E731
    L = first["context_length"]
    head = " | ".join(f"{name} on {short(t)}" if len(models) > 1 else f"perplexity on {short(t)}"
                      for t in texts for name in models)
    lines = [f"| loops (test-time depth) @ {L} tokens | {head} | MFLOPs per token |",
             "|---" * (len(texts) * len(models) + 2) + "|"]
    teacher = first.get("recurrence_teacher")
    if teacher:
        ppl = {t: (first.get("perplexity_by_text", {}).get(t) or first["perplexity"]).get("teacher") for t in texts}
        cells = " | ".join(f"{ppl[t]:.2f}" for t in texts for _ in models)
        lines.append(f"| source model | {cells} | {teacher['flops_per_token'] / 1e6:.0f} |")
    for r in first["recurrence"]:
        cells = []
        for t in texts:
            for res in models.values():
                v = (res.get("recurrence_by_text") or {t: res["recurrence"]}).get(t, {}).get(r)
                cells.append("—" if v is None else f"{v['ppl']:.2f}")
        flops = first["recurrence"][r]["flops_per_token"]
        lines.append(f"| {r} | {' | '.join(cells)} | {flops / 1e6:.0f} |")
    return "\n".join(lines) + "\n"


def write_eval(folder, results: dict) -> list[str]:
    """Write eval.json, the plots next to it, and replace the README's Evaluation section (each file atomically).
    Returns the plot file names."""
    folder = Path(folder)
    write_json_atomic(folder / "eval.json", results, indent=2, default=_jsonable)
    plots = write_plots(results, folder)
    card = folder / "README.md"
    text = card.read_text() if card.exists() else ""
    section = "## Evaluation\n\n" + results_table(results)
    for name, title in plots:
        section += f"\n![{title}]({name})\n"
    if "## Evaluation" in text:
        head, rest = text.split("## Evaluation", 1)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    write_text_atomic(card, text)
    return [name for name, _ in plots]


def _jsonable(value):
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to eval.json")


__all__ = ["BASELINE", "evaluate", "recurrence_table", "results_table", "window_baseline", "write_eval"]
