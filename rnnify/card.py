"""The model card (README.md) of a converted model: front matter for the Hub, method, results, how to load."""

from __future__ import annotations

import yaml

from .eval.memory import attention_cache_bytes, cache_bytes, human_bytes

PAPERS = {
    "supra": ("Linearizing Large Language Models (Mercat et al., 2024)", "https://arxiv.org/abs/2405.06640"),
    "lolcats": ("LoLCATs: On Low-Rank Linearizing of Large Language Models (Zhang et al., 2024)",
                "https://arxiv.org/abs/2410.10254"),
}


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
    from .eval.report import results_table

    cfg = student.config
    method = cfg.method or "rnnify"
    kept = [i for i, m in enumerate(cfg.layer_mixers) if m == "attention"]
    tags = ["rnnify", method, "hybrid" if kept else "linear-attention"]
    if kept:
        tags.append("linear-attention")
    front = {"base_model": source, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    paper, url = PAPERS.get(method, (method, ""))
    where = repo_id or "PATH_OR_REPO_ID"
    n = cfg.num_hidden_layers
    layers = (f"{n - len(kept)} of {n} layers converted; layers {kept} stay softmax attention" if kept
              else f"all {n} layers converted")
    settings = {k: v for k, v in cfg.mixer_config.items() if k != "per_layer"}
    train_lines = "- none: conversion only (surgery, not yet trained)"
    if training:
        train_lines = "\n".join(f"- `{k}`: {v.get('steps')} steps, {v.get('tokens', 0):,} tokens, final loss "
                                f"{v.get('final_loss', float('nan')):.4g}" for k, v in training.items())
    text = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else name or method}: {method} conversion of {source}", "",
        f"Made with rnnify from `{source}` by the **{method}** method ([{paper}]({url})): {layers}; "
        f"mixer settings `{settings}`.", "",
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


def read_front_matter(card: str) -> dict:
    if not card.startswith("---\n"):
        return {}
    return yaml.safe_load(card.split("---\n", 2)[1]) or {}
