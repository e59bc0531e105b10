"""Pushing a converted model to the Hugging Face Hub: validate everything locally, then one commit."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import HfApi, get_token

from .errors import RnnifyError
from .modeling.remote_code import remote_code_sources
from .sources import check_weights

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# what a folder saved by rnnify 0.1 (no layer program) ships
_V01_REMOTE_CODE = ("configuration_rnnify.py", "modeling_rnnify.py", "mixers.py", "sink_window_cache.py",
                    "kernels_reference.py")


def check_repo_id(repo_id: str) -> str:
    if not repo_id or not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        raise RnnifyError(f"repo id {repo_id!r} is not owner/name (letters, digits, '-', '_', '.'), e.g. user/smollm2-lolcats")
    return repo_id


def check_model_folder(folder) -> list[str]:
    """Every file an rnnify model needs, or an error naming what is missing. Returns the files to upload."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RnnifyError(f"{folder} is not a folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise RnnifyError(f"{folder} has no config.json: not a saved model")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RnnifyError(f"{cfg_path} is not valid JSON ({e}); re-save the model before pushing it") from None
    if not isinstance(cfg, dict):
        raise RnnifyError(f"{cfg_path} is not a JSON object; re-save the model before pushing it")
    if cfg.get("model_type") != "rnnify":
        raise RnnifyError(f"{folder} holds a {cfg.get('model_type')!r} model, not an rnnify conversion")
    if "modeling_rnnify.RnnifyForCausalLM" not in json.dumps(cfg.get("auto_map", {})):
        raise RnnifyError(f"{folder}/config.json has no auto_map to modeling_rnnify: re-save it with rnnify")

    code = sorted(remote_code_sources()) if cfg.get("program") is not None else sorted(_V01_REMOTE_CODE)
    missing = [f for f in code if not (folder / f).is_file()]
    index = folder / "model.safetensors.index.json"
    if not index.is_file() and not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors (or model.safetensors.index.json + shards)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not (folder / "README.md").is_file():
        missing.append("README.md (model card)")
    partial = [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial"))]
    if missing or partial:
        raise RnnifyError(f"{folder} is not a complete rnnify model: missing {', '.join(missing) or '-'}"
                          + (f"; unfinished files {partial}" if partial else ""))

    check_weights(folder)  # a garbled shard index, a missing shard, a truncated or zero-headed safetensors file
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def check_revision(revision: str) -> str:
    """A branch name git (and the Hub) accepts (git check-ref-format rules), refused locally before any network."""
    bad = (not revision or revision.startswith(("-", "/", ".")) or revision.endswith(("/", ".", ".lock"))
           or ".." in revision or "//" in revision or "@{" in revision or revision == "@"
           or any(c in revision for c in " ~^:?*[\\") or any(ord(c) < 32 or ord(c) == 127 for c in revision)
           or any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")))
    if bad:
        raise RnnifyError(f"--revision {revision!r} is not a valid branch name; accepted: letters, digits, '-', '_', "
                          "'.', '/' (no spaces, '..', '~^:?*[\\', or a leading '-'), e.g. main or v1")
    return revision


def resolve_token(token: str | None = None) -> str:
    token = token or get_token()
    if not token:
        raise RnnifyError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login` (a write token)")
    return token


def push(folder, repo_id: str, *, private: bool = False, revision: str = "main", token: str | None = None,
         commit_message: str | None = None, api=None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit. ``api`` defaults to ``HfApi``."""
    check_repo_id(repo_id)
    check_revision(revision)
    files = check_model_folder(folder)
    token = resolve_token(token)
    if api is None:
        api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
            commit_message=commit_message or f"Upload rnnify model ({len(files)} files)",
            ignore_patterns=[".*", "*.tmp"],
        )
    except RnnifyError:
        raise
    except Exception as e:  # HTTP errors, auth, offline
        raise RnnifyError(f"pushing {folder} to {repo_id} failed: {type(e).__name__}: {e}") from e
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
