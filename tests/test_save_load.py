"""A converted model saves as safetensors + code and loads in a fresh process, with and without rnnify."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from rnnify.convert import convert

from .conftest import tiny_model

# Runs in a fresh interpreter: loads the model, prints logits for fixed ids as JSON.
LOADER = textwrap.dedent(
    """
    import json, sys
    block = sys.argv[3] == "block"
    if block:  # make rnnify unimportable, as on a machine where it is not installed
        import importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "rnnify" or name.startswith("rnnify."):
                    raise ImportError("rnnify is blocked in this test")
        sys.meta_path.insert(0, Block())
        try:
            import rnnify  # noqa
            raise SystemExit("rnnify should not be importable")
        except ImportError:
            pass
    else:
        import rnnify  # noqa
    import torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=block)
    assert type(model).__name__ == "RnnifyForCausalLM", type(model)
    assert ("rnnify." in type(model).__module__) != block, type(model).__module__
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    print(json.dumps({"logits": logits.tolist(), "gen": gen.tolist()}))
    """
)


def _load_in_subprocess(path, ids, mode, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, str(script), str(path), json.dumps(ids), mode],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method,keep", [("supra", "0"), ("lolcats", ""), ("mamba_in_llama", "1")])
def test_save_then_load_in_fresh_processes(tmp_path, method, keep):
    student = convert(tiny_model("qwen2"), method, keep_attention=keep, options={"chunk_size": 8})
    path = tmp_path / "model"
    student.save_pretrained(path)
    files = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_rnnify.py", "configuration_rnnify.py", "mixers.py",
            "kernels_reference.py", "sink_window_cache.py"} <= files
    assert json.loads((path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_rnnify.RnnifyForCausalLM"

    ids = torch.randint(0, 128, (2, 13))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        original = student(ids).logits
        expected = loaded(ids).logits
        gen = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    # the source model ran eager attention, the loaded one runs the default (sdpa): equal up to rounding
    torch.testing.assert_close(expected, original, atol=1e-5, rtol=1e-5)
    for mode in ("import", "block"):
        got = _load_in_subprocess(path, ids.tolist(), mode, tmp_path)
        assert torch.equal(torch.tensor(got["logits"]), expected), mode
        assert got["gen"] == gen.tolist(), mode


def test_bf16_save_keeps_dtype(tmp_path):
    student = convert(tiny_model("llama"), "lolcats").to(torch.bfloat16)
    student.save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for (n, a), (_, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
