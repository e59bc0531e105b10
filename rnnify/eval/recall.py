"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", sec. 3): key-value pairs in the prompt, then
queries for some of the keys. It needs the whole context in the state: what a fixed-size state (a window, a small
recurrent state) loses first, and what state expansion (StateX) is for.

Natural-language form, so it runs on any pretrained tokenizer: "Remember these codes. apple: 4821, river: 1937, ...
The code of river is" and the answer " 1937". A query counts as recalled when greedy decoding would produce every
answer token: scored in one forward with the answer teacher-forced (exactly what greedy generation would emit, token
for token, as long as each earlier answer token was right).
"""

from __future__ import annotations

import copy
import math
import random

import torch

from ..modeling.generation_cache import cache_keyword

KEYS = (
    "apple", "river", "candle", "forest", "window", "tiger", "pencil", "garden", "rocket", "violin", "basket", "mirror",
    "island", "ladder", "pepper", "castle", "bottle", "dragon", "feather", "harbor", "jacket", "kettle", "lemon",
    "marble", "needle", "orange", "parrot", "quartz", "saddle", "tunnel", "umbrella", "velvet", "wagon", "yogurt",
    "anchor", "bridge", "carpet", "desert", "engine", "falcon", "guitar", "helmet", "insect", "jungle", "kitten",
    "lantern", "meadow", "napkin", "oyster", "pillow", "rabbit", "silver", "teapot", "valley", "walnut", "zebra",
    "blanket", "cactus", "dolphin", "glacier", "hammer", "iceberg", "jewel", "koala", "lizard", "monkey", "nectar",
    "orchid", "pirate", "quiver", "rainbow", "spider", "tractor", "unicorn", "volcano", "whistle", "anvil", "beacon",
    "cobalt", "dagger", "ember", "fossil", "goblet", "hazel", "ivory", "jasmine", "kayak", "locket", "magnet",
    "nugget", "onion", "pebble", "quilt", "raven", "shovel", "thimble", "urchin", "vessel", "wizard",
)


def make_prompt(num_pairs: int, queries: int, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """The pairs' text and the (question, answer) queries for a random draw of ``num_pairs`` distinct keys."""
    if num_pairs > len(KEYS):
        raise ValueError(f"at most {len(KEYS)} pairs (distinct keys)")
    keys = rng.sample(KEYS, num_pairs)
    values = [str(rng.randint(1000, 9999)) for _ in keys]
    context = "Remember these codes. " + ", ".join(f"{k}: {v}" for k, v in zip(keys, values)) + ".\n"
    asked = rng.sample(range(num_pairs), min(queries, num_pairs))
    return context, [(f"The code of {keys[i]} is", f" {values[i]}") for i in asked]


def _read_whole(model, p: list[int], a: list[int]) -> torch.Tensor:
    """The logits that predict answer tokens ``a`` after prompt tokens ``p``, from one forward over both."""
    ids = torch.tensor([p + a], device=next(model.parameters()).device)
    return model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1]


@torch.no_grad()
def recalled(model, tokenizer, prompt: str, answer: str) -> bool:
    """Whether greedy decoding after ``prompt`` produces ``answer`` (every token), scored in one forward."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"][len(p):]
    return bool((_read_whole(model, p, a).argmax(-1).cpu() == torch.tensor(a)).all())


def _repeated(cache, n: int):
    """A copy of ``cache`` holding ``n`` copies of its one row, or None when one of its layers cannot repeat its rows
    (transformers' ``LinearAttentionLayer`` has no ``batch_repeat_interleave``)."""
    if cache is None or not all(hasattr(layer, "batch_repeat_interleave") for layer in getattr(cache, "layers", [None])):
        return None
    state = copy.deepcopy(cache)
    if n > 1:
        state.batch_repeat_interleave(n)
    return state


@torch.no_grad()
def answer_logits(model, tokenizer, context: str, qa: list[tuple[str, str]]) -> list[tuple[torch.Tensor, list[int]]]:
    """For each query, the logits that predict its answer tokens after ``context + question``, and those tokens, with
    the context read once: its cache (the window's keys and values, the recurrent state) is repeated once per query,
    and every query's question and answer are read in one batch from there (right-padded: a pad only follows a row's
    own tokens, so it changes none of their logits); a cache that cannot repeat its rows is copied for each query in
    turn. The full forward's logits (each layer's step form), for a fraction of the cost when the pairs are most of
    the prompt. A query whose tokens do not begin with the context's own (a merge across the boundary), or a model
    that returns no cache, is read whole."""
    device = next(model.parameters()).device
    key = cache_keyword(model.forward)
    c = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = model(input_ids=torch.tensor([c], device=device), use_cache=True)
    cache = out.get("cache", out.get("past_key_values"))
    rows = []
    for question, answer in qa:
        p = tokenizer(context + question, add_special_tokens=False)["input_ids"]
        rows.append((p, tokenizer(context + question + answer, add_special_tokens=False)["input_ids"][len(p):]))
    shared = [] if cache is None else [i for i, (p, _) in enumerate(rows) if p[:len(c)] == c and len(p) > len(c)]
    logits = [None] * len(rows)
    state = _repeated(cache, len(shared)) if shared else None
    groups = [shared] if state is not None else [[i] for i in shared]  # one batch, or one query at a time
    for group in groups:
        tails = [rows[i][0][len(c):] + rows[i][1] for i in group]
        width = max(len(t) for t in tails)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tails[0][0]
        batch = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=device)
        step = model(input_ids=batch, use_cache=True, **{key: state if state is not None else copy.deepcopy(cache)})
        for j, i in enumerate(group):
            start = len(rows[i][0]) - len(c) - 1
            logits[i] = step.logits[j, start : start + len(rows[i][1])]
    for i, (p, a) in enumerate(rows):
        if logits[i] is None:
            logits[i] = _read_whole(model, p, a)
    return [(lg.float().cpu(), a) for lg, (_, a) in zip(logits, rows)]


def recalled_after(model, tokenizer, context: str, qa: list[tuple[str, str]]) -> list[bool]:
    """``recalled(model, tokenizer, context + question, answer)`` for every query, the context read once."""
    return [bool((logits.argmax(-1) == torch.tensor(a)).all()) for logits, a in answer_logits(model, tokenizer,
                                                                                               context, qa)]


def mqar_accuracy(model, tokenizer, num_pairs: int, trials: int = 4, queries: int = 8, seed: int = 0) -> dict:
    """Share of ``queries`` x ``trials`` keys recalled after ``num_pairs`` key-value pairs; ``stderr`` is the
    standard error of that mean over the trials (each trial a fresh set of pairs)."""
    rng = random.Random(seed * 7919 + num_pairs)
    per_trial = []
    longest = 0
    for _ in range(trials):
        context, qa = make_prompt(num_pairs, queries, rng)
        per_trial.append(sum(recalled_after(model, tokenizer, context, qa)) / len(qa))
        for question, answer in qa:
            longest = max(longest, len(tokenizer(context + question + answer, add_special_tokens=False)["input_ids"]))
    return {"pairs": num_pairs, "accuracy": sum(per_trial) / trials, "queries": trials * queries,
            "per_trial": per_trial, "stderr": _stderr(per_trial), "prompt_tokens": longest}


def paired_difference(a: list[float], b: list[float]) -> dict:
    """The mean of ``a[t] - b[t]`` over trials answered on the same prompts (two models' ``per_trial`` from the same
    seed) and its standard error. Pairing removes what the prompts themselves vary by (some key sets are harder
    for every model), so the difference is judged far more tightly than by the two accuracies' own spreads."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired trials: {len(a)} against {len(b)}; accepted: the same number, at least one")
    diffs = [x - y for x, y in zip(a, b)]
    return {"mean": sum(diffs) / len(diffs), "stderr": _stderr(diffs), "trials": len(diffs)}


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


__all__ = ["KEYS", "make_prompt", "mqar_accuracy", "paired_difference", "recalled"]
