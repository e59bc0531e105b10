"""Decode speed and cache memory after a prompt of a given length.

Speed is measured on the decode steps themselves: one prefill, a few untimed warm-up steps, then each step timed on
its own (synchronised on GPUs), reported as the median. A figure that cannot be measured (no step took measurable
time) is reported as None, never as a number.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from transformers import DynamicCache

from ..cache_size import measured_cache_bytes
from ..modeling.generation_cache import cache_keyword


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_decode(model, ids: torch.Tensor, steps: int, warmup: int = 2, cache=None, step_fn=None) -> dict:
    """Prefill ``ids`` once, then greedy-decode ``warmup + steps`` tokens one at a time with the cache.

    ``step_fn(token [B, 1]) -> logits [B, 1, V]`` replaces the model call for a step (e.g. a CUDA-graph replay).
    Returns prefill seconds, per-step seconds (the timed ones), the generated tokens and the cache."""
    device = ids.device
    cache = DynamicCache(config=model.config.get_text_config(decoder=True)) if cache is None else cache
    # a remote-code teacher may still take `past_key_values`: `cache=` would vanish into its **kwargs and the
    # decode would recompute the whole prefix at every step
    kw = cache_keyword(model.forward)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1:]
    _sync(device)
    prefill = time.perf_counter() - t0
    step = step_fn or (lambda tok: model(input_ids=tok, use_cache=True, **{kw: cache}).logits)
    tokens, times = [], []
    for i in range(warmup + steps):
        nxt = logits[:, -1:].argmax(-1)
        tokens.append(nxt)
        _sync(device)
        t = time.perf_counter()
        logits = step(nxt)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"prefill_s": prefill, "step_s": times, "tokens": torch.cat(tokens, 1), "cache": cache}


def tokens_per_s(batch: int, step_times: list[float]) -> float | None:
    """Tokens/s from the median step time; None when the steps could not be timed."""
    if not step_times:
        return None
    median = statistics.median(step_times)
    if not (median > 0 and math.isfinite(median)):
        return None
    return batch / median


@torch.no_grad()
def decode_speed(model, context_length: int, new_tokens: int = 32, batch: int = 1, seed: int = 0, warmup: int = 2) -> dict:
    """Prefill ``context_length`` random tokens, then decode ``new_tokens`` timed steps (after ``warmup``)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    x = torch.randint(0, vocab, (batch, context_length), generator=g).to(device)
    r = timed_decode(model, x, new_tokens, warmup)
    return {
        "context_length": context_length,
        "batch": batch,
        "prefill_s": r["prefill_s"],
        "decode_tokens_per_s": tokens_per_s(batch, r["step_s"]),
        "step_ms_median": statistics.median(r["step_s"]) * 1e3 if r["step_s"] else None,
        "timed_steps": len(r["step_s"]),
        "cache_tokens": context_length + warmup + new_tokens,
        "cache_bytes": measured_cache_bytes(r["cache"]),
    }
