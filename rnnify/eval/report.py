"""Evaluation of a student side by side with its teacher and the window-only baseline; eval.json and the
model card table."""

from __future__ import annotations

import json
import time

from .memory import human_bytes
from .passkey import passkey_accuracy
from .perplexity import perplexity, windows
from .spec import EvalSpec
from .speed import decode_speed


def window_baseline(student, teacher):
    """The teacher with the student's window + sinks softmax and no memory of older tokens (same kept layers):
    the ``window`` method with the student's settings, or 64 + 4."""
    from ..convert import convert

    settings = student.config.mixer_config
    window = settings.get("window", 64)
    sinks = settings.get("sinks", 4)
    keep = [i for i, m in enumerate(student.config.layer_mixers) if m == "attention"]
    base = convert(teacher, "window", keep_attention=keep, options={"window": window, "sinks": sinks})
    return base, f"window {window} + {sinks} sinks"


def evaluate(student, tokenizer, spec: EvalSpec, teacher=None, log=print) -> dict:
    from ..distill.data import tokenize_text_file

    lengths = spec.context_lengths
    results: dict = {"context_length": lengths[0]}
    models = {"student": student}
    if teacher is not None and spec.teacher:
        models["teacher"] = teacher
    if teacher is not None and spec.baseline:
        base, label = window_baseline(student, teacher)
        models["window_baseline"] = base
        results["baseline"] = label

    t0 = time.time()
    tokens = tokenize_text_file(spec.text, tokenizer)
    by_context = {}
    for L in lengths:
        blocks = windows(tokens, L, spec.num_windows)
        ppl = {}
        for name, m in models.items():
            r = perplexity(m, blocks)
            ppl[name] = r["ppl"]
            log(f"perplexity @ {L}: {name} {r['ppl']:.2f}")
        row = {**ppl, "text": spec.text, "windows": int(blocks.shape[0]), "tokens": int(blocks[:, 1:].numel())}
        if "teacher" in ppl and "window_baseline" in ppl:
            gap = ppl["window_baseline"] - ppl["teacher"]
            row["gap_recovered"] = (ppl["window_baseline"] - ppl["student"]) / gap if gap > 0 else None
        by_context[str(L)] = row
    results["perplexity"] = by_context[str(lengths[0])]
    if len(lengths) > 1:
        results["perplexity_by_context"] = by_context

    if spec.recurrence and len(getattr(student, "blocks", [])):
        from .flops import flops_per_token

        blocks = windows(tokens, lengths[0], spec.num_windows)
        results["recurrence"] = {}
        for r in spec.recurrence:
            ppl = perplexity(student, blocks, recurrence=r)["ppl"]
            flops = flops_per_token(student, lengths[0], recurrence=r)
            results["recurrence"][str(r)] = {"ppl": ppl, "flops_per_token": flops}
            log(f"perplexity @ {lengths[0]} with {r} loops: {ppl:.2f} ({flops / 1e6:.0f} MFLOPs/token)")
        if "teacher" in models:
            results["recurrence_teacher"] = {"ppl": by_context[str(lengths[0])]["teacher"],
                                             "flops_per_token": flops_per_token(teacher, lengths[0])}
    elif spec.recurrence:
        from ..errors import RnnifyError

        raise RnnifyError("--recurrence: the model has no recurrent block (convert with --method retrofit)")

    if spec.mqar_pairs:
        from .memory import cache_bytes
        from .recall import mqar_accuracy

        results["mqar"] = {}
        for n in spec.mqar_pairs:
            row = {}
            for name in ("teacher", "student"):
                if name in models:
                    r = mqar_accuracy(models[name], tokenizer, n, trials=spec.mqar_trials)
                    row[name] = r["accuracy"]
                    row["prompt_tokens"] = r["prompt_tokens"]
                    log(f"MQAR @ {n} pairs ({r['prompt_tokens']} tokens): {name} {r['accuracy']:.0%}")
            row["student_cache_bytes"] = cache_bytes(student, row["prompt_tokens"])
            results["mqar"][str(n)] = row

    results["passkey"] = {}
    for length in spec.passkey_lengths:
        for name in ("teacher", "student"):
            if name in models:
                r = passkey_accuracy(models[name], tokenizer, length, spec.passkey_trials)
                results["passkey"].setdefault(str(length), {})[name] = r["accuracy"]
                log(f"passkey @ {length}: {name} {r['accuracy']:.0%}")

    results["speed"] = {}
    for length in spec.speed_lengths:
        for name in ("teacher", "student"):
            if name in models:
                r = decode_speed(models[name], length, spec.speed_new_tokens)
                results["speed"].setdefault(str(length), {})[name] = {
                    "decode_tokens_per_s": r["decode_tokens_per_s"], "cache_bytes": r["cache_bytes"]}
                speed = "could not be measured" if r["decode_tokens_per_s"] is None else \
                    f"{r['decode_tokens_per_s']:.1f} tok/s (median of {r['timed_steps']} steps)"
                log(f"decode @ {length}: {name} {speed}, cache {human_bytes(r['cache_bytes'])}")
    results["seconds"] = round(time.time() - t0, 1)
    return results


def results_table(results: dict) -> str:
    """Markdown table: one row per measurement, teacher | student | window baseline."""
    if not results:
        return "_not evaluated_\n"
    p = results["perplexity"]
    rows = ["| measurement | teacher | student | window baseline |", "|---|---|---|---|"]
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    name = str(p.get("text", "text")).replace("builtin:", "").split("/")[-2:]
    for L, q in results.get("perplexity_by_context", {str(results["context_length"]): p}).items():
        rows.append(f"| perplexity on {'/'.join(name)} @ {L} tokens ({q['windows']} windows) | {f(q.get('teacher'))} | "
                    f"{f(q.get('student'))} | {f(q.get('window_baseline'))} |")
    for n, r in results.get("mqar", {}).items():
        pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
        rows.append(f"| MQAR recall, {n} pairs (~{r['prompt_tokens']} tokens; student state "
                    f"{human_bytes(r['student_cache_bytes'])}) | {pct(r.get('teacher'))} | {pct(r.get('student'))} | — |")
    for length, r in results.get("passkey", {}).items():
        pct = lambda v: "—" if v is None else f"{v:.0%}"  # noqa: E731
        rows.append(f"| passkey accuracy @ {length} | {pct(r.get('teacher'))} | {pct(r.get('student'))} | — |")
    for length, r in results.get("speed", {}).items():
        t, s = r.get("teacher", {}), r.get("student", {})
        tok = lambda d: "—" if not d else "not measurable" if d["decode_tokens_per_s"] is None \
            else f"{d['decode_tokens_per_s']:.1f}"  # noqa: E731
        mem = lambda d: "—" if not d else human_bytes(d["cache_bytes"])  # noqa: E731
        rows.append(f"| decode tokens/s after {length} (batch 1) | {tok(t)} | {tok(s)} | — |")
        rows.append(f"| cache after {length} tokens | {mem(t)} | {mem(s)} | — |")
    text = "\n".join(rows) + "\n"
    if results.get("recurrence"):
        t = results.get("recurrence_teacher")
        text += f"\n| loops (test-time depth) | perplexity @ {results['context_length']} | MFLOPs per token |\n|---|---|---|\n"
        if t:
            text += f"| source model | {t['ppl']:.2f} | {t['flops_per_token'] / 1e6:.0f} |\n"
        for r, v in results["recurrence"].items():
            text += f"| {r} | {v['ppl']:.2f} | {v['flops_per_token'] / 1e6:.0f} |\n"
    if p.get("gap_recovered") is not None and p["gap_recovered"] >= 0:
        text += (f"\nThe student recovers {p['gap_recovered']:.1%} of the perplexity gap between the window-only "
                 f"baseline ({results.get('baseline', '')}) and the teacher.\n")
    elif p.get("gap_recovered") is not None:
        text += (f"\nThe student is behind the window-only baseline ({results.get('baseline', '')}): it has not "
                 "recovered the gap to the teacher yet.\n")
    return text


def write_eval(folder, results: dict) -> None:
    """Write eval.json and replace the README's Evaluation section (each file atomically)."""
    import os
    from pathlib import Path

    folder = Path(folder)
    tmp = folder / "eval.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, folder / "eval.json")
    card = folder / "README.md"
    text = card.read_text() if card.exists() else ""
    section = "## Evaluation\n\n" + results_table(results)
    if results.get("recurrence"):
        from .plots import recurrence_plot

        recurrence_plot(results, folder / "recurrence.png")
        section += "\n![perplexity against loops](recurrence.png)\n"
    if "## Evaluation" in text:
        head, rest = text.split("## Evaluation", 1)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    tmp = folder / "README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, card)
