"""Pushing to the Hub (only the network calls are stood in for), the model card, sharded folders."""

import json
import os
import subprocess
import sysconfig
import textwrap
import venv

import pytest
import torch

from rnnify.card import read_front_matter
from rnnify.cli import main
from rnnify.errors import RnnifyError
from rnnify.hub import check_repo_id, push


class RecordingApi:
    """Stands in for huggingface_hub.HfApi's network calls; records what it is given."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def create_branch(self, **kw):
        self.calls.append(("create_branch", kw))

    def upload_folder(self, **kw):
        files = sorted(p for p in os.listdir(kw["folder_path"]) if not p.startswith("."))
        self.calls.append(("upload_folder", {**kw, "files": files}))

        class Info:
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"

        return Info()


@pytest.fixture
def converted(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["convert", str(tiny_llama_dir), "--method", "lolcats", "--keep-attention", "0",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def test_push_uploads_the_folder_in_one_commit(converted, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    api = RecordingApi()
    url = push(converted, "user/tiny-lolcats", private=True, revision="dev", api=api)
    assert url.endswith("/commit/abc")
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "user/tiny-lolcats", "repo_type": "model", "private": True, "exist_ok": True}
    upload = api.calls[2][1]
    assert upload["repo_id"] == "user/tiny-lolcats" and upload["revision"] == "dev"
    assert {"config.json", "model.safetensors", "modeling_rnnify.py", "configuration_rnnify.py", "mixers.py",
            "kernels_reference.py", "sink_window_cache.py", "tokenizer.json", "README.md"} <= set(upload["files"])


def test_card_front_matter_and_sections(converted):
    card = (converted / "README.md").read_text()
    fm = read_front_matter(card)
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    assert fm["base_model"].endswith("tiny-llama")
    assert {"rnnify", "lolcats", "hybrid", "linear-attention"} <= set(fm["tags"])
    assert "arxiv.org/abs/2410.10254" in card and "trust_remote_code=True" in card
    assert "| 4,096 tokens |" in card and "x smaller" in card


@pytest.mark.parametrize(
    "repo,setup,needle",
    [
        ("not-a-repo-id", None, "is not owner/name"),
        ("a/b/c", None, "is not owner/name"),
        ("user/x", "no_token", "no Hugging Face token"),
        ("user/x", "drop_code", "missing mixers.py"),
        ("user/x", "drop_weights", "missing model.safetensors"),
        ("user/x", "partial", "unfinished files"),
        ("user/x", "truncated_weights", "is damaged or truncated"),
        ("user/x", "garbled_index", "model.safetensors.index.json is damaged"),
    ],
)
def test_nothing_is_sent_when_validation_fails(converted, monkeypatch, repo, setup, needle):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    if setup == "no_token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(converted.parent / "empty-hf-home"))
        import huggingface_hub.constants as C

        monkeypatch.setattr(C, "HF_TOKEN_PATH", str(converted.parent / "no-token"))
        monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", str(converted.parent / "no-tokens"))
    elif setup == "drop_code":
        (converted / "mixers.py").unlink()
    elif setup == "drop_weights":
        (converted / "model.safetensors").unlink()
    elif setup == "partial":
        (converted / "model.safetensors.tmp").write_text("x")
    elif setup == "truncated_weights":
        data = (converted / "model.safetensors").read_bytes()
        (converted / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif setup == "garbled_index":
        (converted / "model.safetensors").rename(converted / "model-00001-of-00001.safetensors")
        (converted / "model.safetensors.index.json").write_text('{"weight_map": ["model-00001-of-00001')
    api = RecordingApi()
    with pytest.raises(RnnifyError, match=needle):
        push(converted, repo, api=api)
    assert api.calls == []


def test_push_cli_rejects_a_non_rnnify_folder(tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert main(["push", str(tiny_llama_dir), "user/x"]) == 2
    assert "holds a 'llama' model, not an rnnify conversion" in capsys.readouterr().err


def test_repo_ids():
    assert check_repo_id("user/smollm2-135m-lolcats") == "user/smollm2-135m-lolcats"
    for bad in ("user", "/x", "user/", "us er/x", "user/x--y"):
        with pytest.raises(RnnifyError):
            check_repo_id(bad)


def test_sharded_folder_loads_in_a_fresh_venv_without_rnnify(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert main(["convert", str(tiny_llama_dir), "--method", "supra", "--max-shard-size", "100KB",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)

    # A fresh virtual environment whose only packages are this one's dependencies, reached through a .pth
    # line: rnnify's own editable install (a .pth hook in site-packages) is not processed there.
    env_dir = tmp_path / "fresh-venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    fresh_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    parent_site = sysconfig.get_paths()["purelib"]
    with open(os.path.join(fresh_site, "deps.pth"), "w") as f:
        f.write(parent_site + "\n")
    script = textwrap.dedent(f"""
        import importlib.util, json, torch, transformers
        assert importlib.util.find_spec("rnnify") is None, "rnnify must not be importable here"
        m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        print(json.dumps(m(torch.arange(10)[None]).logits[0, -1, :5].tolist()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    r = subprocess.run([str(py), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        expected = ref(torch.arange(10)[None]).logits[0, -1, :5]
    assert torch.equal(torch.tensor(json.loads(r.stdout.strip().splitlines()[-1])), expected)


def test_recipe_pushes_after_saving(tmp_path, monkeypatch):
    import rnnify.hub
    from rnnify.pipeline.runner import run_recipe

    from .test_training import recipe

    wd = _workdir(tmp_path)
    recorded = RecordingApi()
    monkeypatch.setattr(rnnify.hub, "HfApi", lambda token=None: recorded)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    r = recipe(wd, [{"type": "distill", "max_steps": 1}], hub={"repo_id": "user/tiny-run", "push": True})
    summary = run_recipe(r, progress=False)
    assert summary["hub_url"].endswith("/commit/abc")
    upload = dict(recorded.calls)["upload_folder"]
    assert upload["folder_path"] == str(wd / "out") and "recipe.yaml" in upload["files"]
    fm = read_front_matter((wd / "out" / "README.md").read_text())
    assert fm["tags"][:2] == ["rnnify", "lolcats"]
    assert "user/tiny-run" in (wd / "out" / "README.md").read_text()


def test_recipe_push_without_token_fails_before_training(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    from rnnify.pipeline.runner import run_recipe

    from .test_training import recipe

    wd = _workdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    r = recipe(wd, [{"type": "distill", "max_steps": 1}], hub={"repo_id": "user/tiny-run", "push": True})
    with pytest.raises(RnnifyError, match="no Hugging Face token"):
        run_recipe(r, progress=False)
    assert not (wd / "out").exists() and not (wd / "out.run" / "metrics.jsonl").exists()
    with pytest.raises(RnnifyError, match="is not owner/name"):
        recipe(wd, [{"type": "distill", "max_steps": 1}], hub={"repo_id": "nope", "push": True})


def _workdir(tmp_path):
    from .conftest import make_tokenizer, tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src")
    make_tokenizer(128).save_pretrained(tmp_path / "src")
    (tmp_path / "data.txt").write_text("\n".join(" ".join(f"w{(i + j) % 30}" for j in range(30)) for i in range(60)))
    return tmp_path
