"""Tiny random source models of each supported family, built from configs (no downloads)."""

from __future__ import annotations

import os

# Without a GPU the Triton kernels are tested in Triton's interpreter. Triton reads this when its functions
# are decorated, i.e. when triton is first imported (torch and transformers may import it): so before them.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The token cache of the test runs (and of the processes they start) lives in a temporary folder, not ~/.cache.
# It is removed when the run ends (each run made a new one, and they piled up in /tmp).
if not os.environ.get("RNNIFY_TOKEN_CACHE"):
    import atexit
    import shutil
    import tempfile

    os.environ["RNNIFY_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="rnnify-test-tokens-")
    atexit.register(shutil.rmtree, os.environ["RNNIFY_TOKEN_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tr  # noqa: E402

import rnnify  # noqa: F401  (registers the Auto classes)

COMMON = dict(
    num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, head_dim=16, max_position_embeddings=512,
)


def tiny_config(family: str):
    if family == "llama":
        cfg = tr.LlamaConfig(**COMMON)
    elif family == "qwen2":
        cfg = tr.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    elif family == "mistral":
        cfg = tr.MistralConfig(**COMMON, sliding_window=6)
    elif family == "qwen3":
        cfg = tr.Qwen3Config(**COMMON)
    elif family == "gemma3_text":
        cfg = tr.Gemma3TextConfig(**COMMON, sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2)
    else:
        raise KeyError(family)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "gemma3_text"]


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def family(request):
    return request.param


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def make_tokenizer(vocab_size: int = 128):
    """A real fast tokenizer over a tiny word-level vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tr.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A saved tiny Llama with a tokenizer: a local 'source model' folder."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    make_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture
def workdir(tmp_path):
    """A folder with a saved tiny Llama source (``src``, tied embeddings as in SmolLM2) and ``data.txt``: repetitive
    text that a model learns in a few steps. Recipes in tests train on it and write ``out`` / ``out.run`` here."""
    import random

    model = tiny_model("llama")
    model.config.tie_word_embeddings = True  # as in SmolLM2: exercises saving tied weights
    model.tie_weights()
    model.save_pretrained(tmp_path / "src")
    make_tokenizer(128).save_pretrained(tmp_path / "src")
    rng = random.Random(0)
    lines = [" ".join(f"w{(i * 7 + j) % 23}" for j in range(rng.randint(20, 40))) for i in range(300)]
    (tmp_path / "data.txt").write_text("\n".join(lines) + "\n")
    return tmp_path
