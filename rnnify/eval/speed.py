"""Decode speed and cache memory after a prompt of a given length."""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from .memory import measured_cache_bytes


@torch.no_grad()
def decode_speed(model, context_length: int, new_tokens: int = 32, batch: int = 1, seed: int = 0) -> dict:
    """Prefill ``context_length`` random tokens, then greedy-decode ``new_tokens`` one by one with the cache."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    x = torch.randint(0, vocab, (batch, context_length), generator=g).to(device)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    t0 = time.perf_counter()
    logits = model(input_ids=x, cache=cache, use_cache=True).logits[:, -1]
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
    t2 = time.perf_counter()
    return {
        "context_length": context_length,
        "batch": batch,
        "prefill_s": t1 - t0,
        "decode_tokens_per_s": batch * new_tokens / (t2 - t1),
        "cache_bytes": measured_cache_bytes(cache),
    }
