"""Passkey retrieval (Mohtashami & Jaggi 2023): a number hidden in filler text at a random depth, asked for
at the end. Needs recall over the whole context: a window alone fails once the key leaves the window."""

from __future__ import annotations

import math
import random

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def make_prompt(tokenizer, length: int, key: int, depth: float) -> str:
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(needle + QUESTION, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    n = max(1, (length - fixed) // per_filler)
    before = int(n * depth)
    return FILLER * before + needle + FILLER * (n - before) + QUESTION


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, trials: int = 5, seed: int = 0) -> dict:
    rng = random.Random(seed + length)
    device = next(model.parameters()).device
    hits, lengths, by_depth = 0, [], []
    for t in range(trials):
        key = rng.randint(10000, 99999)
        depth = (t + 0.5) / trials
        enc = tokenizer(make_prompt(tokenizer, length, key, depth), return_tensors="pt").to(device)
        lengths.append(enc["input_ids"].shape[1])
        out = model.generate(**enc, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None
                             else tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += str(key) in answer
        by_depth.append([depth, int(str(key) in answer)])
    p = hits / trials  # each trial a Bernoulli draw: its standard error is that of a binomial share
    return {"length": length, "accuracy": p, "trials": trials, "stderr": math.sqrt(p * (1 - p) / trials),
            "prompt_tokens": max(lengths),
            "by_depth": by_depth}
