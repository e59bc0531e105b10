"""The cache-size accounting used by inspect/convert/eval equals what a real cache holds."""

import pytest
import torch
from transformers import DynamicCache

from rnnify.cache_size import cache_bytes, measured_cache_bytes
from rnnify.convert import convert

from .conftest import tiny_model


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
@pytest.mark.parametrize("T", [3, 40])
def test_teacher_accounting_matches_a_filled_cache(fam, T):
    """(Every method's accounting is checked in the matrix, test_methods.py.)"""
    model = tiny_model(fam)
    x = torch.randint(0, 128, (2, T))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x[:, : T - 1], cache=cache, use_cache=True)
        model(x[:, T - 1 :], cache=cache, use_cache=True)
    assert measured_cache_bytes(cache) == cache_bytes(model, T, batch=2, kv_bytes=4)


def test_recurrent_state_is_constant_in_length():
    student = convert(tiny_model("llama"), "supra")
    assert cache_bytes(student, 100) == cache_bytes(student, 100_000)
    teacher = tiny_model("llama")
    assert cache_bytes(teacher, 100_000) == 1000 * cache_bytes(teacher, 100)


def test_lolcats_cache_does_not_keep_the_prefill_alive():
    """The window kept after a long prefill owns its memory: a view into the prefill's keys would hold all of them."""
    student = convert(tiny_model("llama"), "lolcats", None, {"window": 8, "sinks": 2, "chunk_size": 8})
    cache = DynamicCache(config=student.config)
    with torch.no_grad():
        student(torch.randint(0, 128, (1, 200)), cache=cache, use_cache=True)
    for layer in cache.layers:
        for t in (layer.recent_k, layer.recent_v, layer.sink_k, layer.sink_v):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
