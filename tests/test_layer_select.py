"""Measured layer selection: scores, plans for a budget, auto:N through convert / recipes, and its errors."""

import json

import pytest
import torch

from rnnify.cli import main
from rnnify.convert import convert
from rnnify.convert.auto_spec import AutoSpec, parse_auto
from rnnify.convert.layer_select import cached_scores, keep_for_budget, plan_cache_bytes, score_layers, teacher_cache_bytes
from rnnify.errors import RnnifyError

from .conftest import make_tokenizer, tiny_model


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 29}" for j in range(24)) for i in range(200)))
    return str(path)


def _broken(student, layer=2, scale=30.0):
    """Make converting ``layer`` hurt: its converted mixer's output projection scaled (a bad conversion there)."""
    with torch.no_grad():
        student.model.layers[layer].self_attn.o_proj.weight.mul_(scale)
    return student


@pytest.mark.parametrize("mode", ["restore", "convert"])
@pytest.mark.parametrize("layer", [1, 2])
def test_the_layer_that_matters_ranks_first(mode, layer):
    teacher = tiny_model("llama")
    torch.manual_seed(0)
    student = _broken(convert(teacher, "supra", keep_attention=[]), layer)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    scores = score_layers(teacher, student, ids, mode)
    assert max(range(4), key=lambda i: scores[i]) == layer, scores
    assert scores == score_layers(teacher, student, ids, mode)  # inference only: the same numbers again


def test_scores_match_full_forward_passes():
    """The prefix replay is exact: each score equals the one from a whole forward pass of the model with that layer
    restored (built by converting with the layer kept as attention)."""
    import torch.nn.functional as F

    teacher = tiny_model("llama")
    torch.manual_seed(0)
    student = convert(teacher, "supra", keep_attention=[])
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    scores = score_layers(teacher, student, ids, "restore")
    with torch.no_grad():
        t = F.log_softmax(teacher(ids).logits, -1)

        def kl(model):
            s = F.log_softmax(model(ids, use_cache=False).logits, -1)
            return float((t.exp() * (t - s)).sum(-1).mean())

        base = kl(student)
        for i in (0, 3):
            torch.manual_seed(0)
            hybrid = convert(teacher, "supra", keep_attention=[i])
            assert scores[i] == pytest.approx(base - kl(hybrid), rel=1e-4, abs=1e-6)


def test_scores_and_new_weights_are_the_same_in_another_process_and_cached(text, monkeypatch, tmp_path):
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path / "cache"))
    teacher, tok = tiny_model("llama"), make_tokenizer(128)
    logs = []
    a, _ = cached_scores(teacher, "lolcats", {"window": 8, "sinks": 2}, tok, text, tokens=96, seq_len=48,
                         log=logs.append)
    b, _ = cached_scores(teacher, "lolcats", {"window": 8, "sinks": 2}, tok, text, tokens=96, seq_len=48,
                         log=logs.append)
    assert a == b and any("from the cache" in m for m in logs)
    (tmp_path / "cache").rename(tmp_path / "gone")
    # recomputed in another process (another hash seed, an empty cache): the same scores and the same new weights.
    # Same machine and code path, so only float rounding of a different thread split could differ: rel 1e-6.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = (
        "import json, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from tests.conftest import tiny_model, make_tokenizer\n"
        "from rnnify.convert.layer_select import cached_scores\n"
        "s, student = cached_scores(tiny_model('llama'), 'lolcats', {'window': 8, 'sinks': 2}, make_tokenizer(128),\n"
        "                           sys.argv[1], tokens=96, seq_len=48, log=lambda m: None)\n"
        "save_file({k: v.contiguous() for k, v in student.state_dict().items()}, sys.argv[2])\n"
        "print(json.dumps(s))\n")
    env = {**os.environ, "RNNIFY_CACHE": str(tmp_path / "other"), "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", script, text, str(tmp_path / "w.safetensors")], env=env,
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    c = json.loads(done.stdout.strip().splitlines()[-1])
    assert c == pytest.approx(a, rel=1e-6, abs=1e-9) and not (tmp_path / "cache").exists()
    _, student = cached_scores(teacher, "lolcats", {"window": 8, "sinks": 2}, tok, text, tokens=96, seq_len=48,
                               log=logs.append)
    theirs = load_file(str(tmp_path / "w.safetensors"))
    assert theirs.keys() == student.state_dict().keys()
    for k, v in student.state_dict().items():
        torch.testing.assert_close(theirs[k], v, rtol=1e-6, atol=0, msg=k)


def test_auto_n_gives_n_layers_through_convert(text, monkeypatch, tmp_path):
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path / "cache"))
    teacher, tok = tiny_model("llama"), make_tokenizer(128)
    logs = []
    student = convert(teacher, "mamba_in_llama", keep_attention="auto:2", tokenizer=tok, select_text=text,
                      log=logs.append)
    kept = [i for i, m in enumerate(student.config.layer_mixers) if m == "attention"]
    scores, _ = cached_scores(teacher, "mamba_in_llama", {}, tok, text, log=logs.append)
    assert len(kept) == 2 and kept == sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
    assert any("from the cache" in m for m in logs)  # convert's scores were cached and reused
    with pytest.raises(RnnifyError, match="needs the source's tokenizer"):
        convert(teacher, "mamba_in_llama", keep_attention="auto:2")
    with pytest.raises(RnnifyError, match="the model has 4 layers"):
        convert(teacher, "mamba_in_llama", keep_attention="auto:9", tokenizer=tok, select_text=text)


def test_select_tokens_sets_how_much_text_auto_scores(text, monkeypatch, tmp_path):
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path / "cache"))
    teacher, tok = tiny_model("llama"), make_tokenizer(128)
    logs = []
    convert(teacher, "lolcats", keep_attention="auto:1", options={"window": 8, "sinks": 2}, tokenizer=tok,
            select_text=text, select_tokens=96, log=logs.append)
    assert any("on 96 tokens of" in m for m in logs), logs
    logs.clear()
    convert(teacher, "lolcats", keep_attention="auto:1", options={"window": 8, "sinks": 2}, tokenizer=tok,
            select_text=text, select_tokens=2000, log=logs.append)
    assert any("on 1,024 tokens of" in m for m in logs), logs  # 2000 tokens hold one whole sequence of 1024
    assert not any("from the cache" in m for m in logs)  # other tokens: another cache entry
    with pytest.raises(RnnifyError, match="scoring on 10 tokens .* at least 64 tokens"):
        convert(teacher, "lolcats", keep_attention="auto:1", tokenizer=tok, select_text=text, select_tokens=10)


def test_cache_budget_plans_and_the_impossible_budget():
    teacher = tiny_model("llama")
    student = convert(teacher, "supra", keep_attention=[])
    scores = [0.1, 0.4, 0.3, 0.2]
    t = teacher_cache_bytes(teacher, 4096)
    one = plan_cache_bytes(student, [1], 4096)
    keep = keep_for_budget(scores, AutoSpec(cache_fraction=one / t, cache_length=4096), student, t)
    assert keep == [1]
    assert keep_for_budget(scores, AutoSpec(cache_fraction=1.0, cache_length=4096), student, t) == [0, 1, 2, 3]
    smallest = plan_cache_bytes(student, [], 4096)
    with pytest.raises(RnnifyError, match=r"the smallest possible \(every layer converted\) is [0-9.]+ (B|KiB|MiB)"):
        keep_for_budget(scores, AutoSpec(cache_fraction=0.5 * smallest / t, cache_length=4096), student, t)


def test_parse_auto():
    assert parse_auto("auto:3") == AutoSpec(layers=3)
    assert parse_auto("auto:10%@8192") == AutoSpec(cache_fraction=0.1, cache_length=8192)
    assert parse_auto("auto:5%") == AutoSpec(cache_fraction=0.05, cache_length=4096)
    assert parse_auto("0,3") is None and parse_auto([1]) is None
    with pytest.raises(RnnifyError, match="accepted auto forms"):
        parse_auto("auto:lots")


def test_select_layers_cli(tiny_llama_dir, tmp_path, capsys, monkeypatch, text):
    monkeypatch.setenv("RNNIFY_CACHE", str(tmp_path / "cache"))
    code = main(["select-layers", str(tiny_llama_dir), "--method", "lolcats", "--window", "8", "--budget-layers", "2",
                 "--text", text, "--tokens", "96", "--seq-len", "48", "--out", str(tmp_path / "sel")])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads((tmp_path / "sel" / "layer_scores.json").read_text())
    assert len(record["scores"]) == 4 and len(record["keep_attention"]) == 2
    assert (tmp_path / "sel" / "layer_scores.png").stat().st_size > 1000
    assert "kept as attention (auto:2)" in out and "cache @ 4k tokens" in out
    assert main(["select-layers", str(tiny_llama_dir), "--method", "lolcats", "--text", text]) != 0
    assert "give one budget" in capsys.readouterr().err
