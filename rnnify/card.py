"""The model card (README.md) of a converted model: front matter for the Hub, method, results, how to load."""

from __future__ import annotations

import yaml

from .cache_size import attention_cache_bytes, cache_bytes
from .convert import METHODS
from .eval.report import results_table
from .modeling.layer_program import describe
from .units import human_bytes


def teacher_cache_bytes(student, seq_len: int, kv_bytes: int = 2) -> int:
    """KV-cache bytes of the source model, from the base config the student carries."""
    base = student.config.base_config
    return sum(attention_cache_bytes(base, t, seq_len, kv_bytes=kv_bytes) for t in student.config.base_layer_types)


def cache_table(student, lengths=(4096, 32768)) -> str:
    rows = ["| context | this model | source model (KV cache) | ratio |", "|---|---|---|---|"]
    for n in lengths:
        s, t = cache_bytes(student, n), teacher_cache_bytes(student, n)
        rows.append(f"| {n:,} tokens | {human_bytes(s)} | {human_bytes(t)} | {t / s:.1f}x smaller |")
    return "\n".join(rows) + "\n\nPer sequence, keys/values in bf16, recurrent states in fp32.\n"


def model_card(student, *, source: str, recipe: dict | None = None, eval_results: dict | None = None,
               training: dict | None = None, repo_id: str | None = None, name: str | None = None) -> str:
    cfg = student.config
    if getattr(cfg, "model_type", None) != "rnnify":  # a transform of a model of another architecture (Mamba2)
        return _plain_card(student, source=source, recipe=recipe, name=name, repo_id=repo_id)
    method = cfg.method or "rnnify"
    applied = [t["method"] for t in cfg.transforms]
    kept = [i for i, m in enumerate(cfg.layer_mixers) if m == "attention"]
    converted = [i for i, m in enumerate(cfg.layer_mixers) if m not in ("attention", "dropped")]
    tags = ["rnnify", method, *applied, "hybrid" if kept and converted else "linear-attention" if converted else "looped"]
    if kept and converted:
        tags.append("linear-attention")
    front = {"base_model": source, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    def cite(m):
        paper = METHODS[m].paper if m in METHODS else None
        return f"**{m}**" + (f" ([{paper.title}]({paper.url}))" if paper else "")

    by = " then ".join(cite(m) for m in [method, *applied])
    where = repo_id or "PATH_OR_REPO_ID"
    n = cfg.num_hidden_layers
    layers = (f"{len(converted)} of {n} layers converted; layers {kept} stay softmax attention" if kept
              else f"all {n} layers converted" if len(converted) == n else f"{len(converted)} of {n} layers converted")
    settings = cfg.mixer_config
    program = "\n".join(describe(cfg.parsed_program(), cfg.layer_types))
    train_lines = "- none: conversion only (surgery, not yet trained)"
    if training:
        train_lines = "\n".join(f"- `{k}`: {v.get('steps')} steps, {v.get('tokens', 0):,} tokens, final loss "
                                f"{v.get('final_loss', float('nan')):.4g}"
                                + "".join(f"; data {d} read from block {b:,} on (past what the model it started "
                                          "from had read)" for d, b in v.get("data_from_block", {}).items())
                                for k, v in training.items())
    text = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else name or method}: {method} conversion of {source}", "",
        f"Made with rnnify from `{source}` by {by}: {layers}; mixer settings `{settings}`.", "",
        "Layer program (what the forward runs):", "", "```", program, "```", "",
        "## Load it", "",
        "```python", "import rnnify, transformers  # rnnify registers the architecture",
        f'model = transformers.AutoModelForCausalLM.from_pretrained("{where}")',
        "", "# without rnnify installed: the modeling code ships with the weights",
        f'model = transformers.AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True)',
        "```", "",
        "## Cache per sequence", "", cache_table(student),
        "## Training", "", train_lines, "",
        "## Evaluation", "", results_table(eval_results or {}),
    ]
    if recipe:
        text += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    return "\n".join(text)


def _plain_card(model, *, source, recipe, name, repo_id) -> str:
    applied = [t["method"] for t in getattr(model.config, "transforms", [])]
    cite = ", ".join(f"**{m}** ([{METHODS[m].paper.title}]({METHODS[m].paper.url}))" for m in applied if m in METHODS)
    front = {"base_model": source, "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["rnnify", *applied, model.config.model_type]}
    where = repo_id or "PATH_OR_REPO_ID"
    rows = ["| context | this model |", "|---|---|"]
    rows += [f"| {n:,} tokens | {human_bytes(cache_bytes(model, n))} |" for n in (4096, 32768)]
    arch = (model.config.architectures or [type(model).__name__])[0]
    text = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
            f"# {repo_id.split('/')[-1] if repo_id else name}: {' + '.join(applied)} of {source}", "",
            f"Made with rnnify from `{source}` ({arch}) by {cite}. It is an ordinary transformers model of its "
            "architecture:", "",
            "```python", "import transformers",
            f'model = transformers.AutoModelForCausalLM.from_pretrained("{where}")', "```", "",
            "## Cache per sequence", "", "\n".join(rows), "", "Recurrent states in fp32, convolution states in bf16.", ""]
    if recipe:
        text += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    return "\n".join(text)


def read_front_matter(card: str) -> dict:
    if not card.startswith("---\n"):
        return {}
    return yaml.safe_load(card.split("---\n", 2)[1]) or {}
