"""Run state on disk: per-stage checkpoints (trainable weights, optimizer, scheduler, step) and the weights at the
end of each finished stage.

Every write goes to a temporary name first, then one rename, so an interrupted run always leaves the previous
checkpoint intact. Every file carries its SHA-256 (a checkpoint's in its ``meta.json``, a finished stage's weights
in ``state.json``), verified before it is used: a damaged checkpoint (zeroed bytes, truncated file, garbled JSON)
is never resumed from silently. ``meta.json`` itself (the step, i.e. the data position, and the run's layout) is
covered by a checksum of its own fields. ``resume_point`` falls back to the newest checkpoint that verifies and says
which it skipped and why.

``optim.pt`` (optimizer, scheduler, RNG state) is read with ``torch.load(weights_only=True)``: a run folder is
something people copy and share, and loading one must never run code from it. A file that holds any other pickled
object is refused outright (``UnsafeCheckpoint``), not skipped for an older checkpoint of the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import RnnifyError
from ..io import file_sha256 as sha256
from ..io import write_json_atomic

_FILES = ("trainable.safetensors", "optim.pt")


class DamagedCheckpoint(RnnifyError):
    """A checkpoint or run-state file that does not verify."""


class UnsafeCheckpoint(RnnifyError):
    """A checkpoint file that holds pickled objects other than tensors and plain values (loading it could run code)."""


def _meta_digest(meta: dict) -> str:
    """SHA-256 of a checkpoint's metadata fields (all but the digest itself), in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DamagedCheckpoint(f"{what} {path} is not a JSON object")
    return data


class RunState:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.state_file = self.dir / "state.json"

    # ---- stages ----------------------------------------------------------------------------------------
    def load(self) -> dict:
        if not self.state_file.exists():
            return {"completed": []}
        data = _read_json(self.state_file, "run state")
        if not isinstance(data.get("completed"), list):
            raise DamagedCheckpoint(f"run state {self.state_file} has no list of completed stages")
        return data

    def completed(self) -> list[str]:
        return self.load()["completed"]

    def stage_weights(self, name: str) -> Path:
        return self.dir / "stages" / name / "model.safetensors"

    def load_stage_weights(self, name: str, model) -> None:
        path = self.stage_weights(name)
        want = self.load().get("stages", {}).get(name, {}).get("sha256")
        if not path.is_file():
            raise DamagedCheckpoint(f"the weights of finished stage {name} are missing ({path}); rerun that stage "
                                    f"with --stage {name}")
        if want is not None and sha256(path) != want:
            raise DamagedCheckpoint(f"the weights of finished stage {name} ({path}) are damaged (checksum mismatch); "
                                    f"rerun that stage with --stage {name}")
        load_model(model, str(path), strict=True)

    def mark_completed(self, name: str, model, info: dict) -> None:
        path = self.stage_weights(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_model(model, str(tmp))  # handles tied weights (embeddings / lm_head)
        digest = sha256(tmp)
        os.replace(tmp, path)
        data = self.load()
        if name not in data["completed"]:
            data["completed"].append(name)
        data.setdefault("stages", {})[name] = {**info, "sha256": digest}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, data, indent=2)
        shutil.rmtree(self.dir / "checkpoints" / name, ignore_errors=True)

    def has_state(self) -> bool:
        """Whether the folder holds anything of an earlier run worth keeping (not just its recipe.yaml)."""
        metrics = self.dir / "metrics.jsonl"
        return (self.state_file.exists() or (self.dir / "checkpoints").exists() or (self.dir / "stages").exists()
                or (metrics.exists() and metrics.stat().st_size > 0))

    def describe(self) -> str:
        try:
            done = self.completed()
        except RnnifyError:
            done = ["(state.json unreadable)"]
        ckpts = sorted((self.dir / "checkpoints").glob("*/step-*")) if (self.dir / "checkpoints").exists() else []
        return (f"finished stages: {', '.join(done) or 'none'}"
                + (f"; checkpoint {ckpts[-1].relative_to(self.dir)}" if ckpts else ""))

    def move_aside(self) -> Path:
        """Keep an earlier run's folder under a new name (never delete it); returns where it went."""
        aside = self.dir.with_name(f"{self.dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{self.dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        os.replace(self.dir, aside)
        return aside

    # ---- checkpoints inside a stage ----------------------------------------------------------------------
    def checkpoints(self, stage: str) -> list[Path]:
        root = self.dir / "checkpoints" / stage
        if not root.exists():
            return []
        return sorted((p for p in root.glob("step-*") if (p / "meta.json").exists()), key=lambda p: int(p.name[5:]))

    def save_checkpoint(self, stage: str, step: int, trainable: dict, optimizer_state: dict, scheduler, extra: dict,
                        keep: int):
        """``trainable``: full tensors by parameter name; ``optimizer_state``: ``{"optimizer": state_dict}`` (keyed
        by parameter index, one process or DDP) or ``{"optimizer_fqn": ...}`` (full tensors keyed by parameter name,
        gathered from FSDP shards)."""
        root = self.dir / "checkpoints" / stage
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:07d}"
        tmp = root / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save({**optimizer_state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
                   tmp / "optim.pt")
        meta = {"step": step, **extra, "sha256": {f: sha256(tmp / f) for f in _FILES}}
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints(stage)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read_checkpoint(path: Path):
        """(meta, trainable tensors, optimizer state) of a checkpoint that verifies; DamagedCheckpoint otherwise."""
        meta = _read_json(path / "meta.json", "checkpoint metadata")
        sums = meta.get("sha256")
        if not isinstance(sums, dict) or not isinstance(meta.get("step"), int):
            raise DamagedCheckpoint(f"checkpoint {path}: meta.json lacks its step or checksums")
        if meta.get("meta_sha256") != _meta_digest(meta):
            raise DamagedCheckpoint(f"checkpoint {path}: meta.json is damaged or edited (its checksum does not match "
                                    "its step and settings)")
        for f in _FILES:
            if not (path / f).is_file():
                raise DamagedCheckpoint(f"checkpoint {path}: {f} is missing")
            if sha256(path / f) != sums.get(f):
                raise DamagedCheckpoint(f"checkpoint {path}: {f} is damaged (checksum mismatch)")
        try:
            trainable = load_file(str(path / "trainable.safetensors"))
        except Exception as e:  # noqa: BLE001 - a file that verified but does not load is damaged all the same
            raise DamagedCheckpoint(f"checkpoint {path} does not load ({type(e).__name__}: {e})") from None
        try:
            optim = torch.load(path / "optim.pt", weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            if "weights only" in str(e).lower() or "weights_only" in str(e):
                raise UnsafeCheckpoint(f"refusing {path / 'optim.pt'}: it holds pickled objects other than tensors "
                                       "and plain values, and loading it could run code; accepted: an optim.pt "
                                       "written by rnnify (restart the stage with --fresh)") from None
            raise DamagedCheckpoint(f"checkpoint {path} does not load (UnpicklingError: {e})") from None
        except Exception as e:  # noqa: BLE001 - a file that verified but does not load is damaged all the same
            raise DamagedCheckpoint(f"checkpoint {path} does not load ({type(e).__name__}: {e})") from None
        return meta, trainable, optim

    def resume_point(self, stage: str, log=print):
        """The newest checkpoint of ``stage`` that verifies, as (path, meta, trainable, optim), or None when the
        stage has none. Damaged ones are skipped with a message; when every one is damaged, a clear error."""
        damaged = []
        for path in reversed(self.checkpoints(stage)):
            try:
                meta, trainable, optim = self.read_checkpoint(path)
            except DamagedCheckpoint as e:  # (UnsafeCheckpoint is not skipped: it stops the run)
                damaged.append(str(e))
                log(f"warning: {e}; trying the previous checkpoint")
                continue
            if damaged:
                log(f"[{stage}] resuming from {path.name}, the newest checkpoint that verifies")
            return path, meta, trainable, optim
        if damaged:
            raise DamagedCheckpoint(f"stage {stage}: every checkpoint is damaged ({'; '.join(damaged)}); restart the "
                                    f"stage without --resume (--fresh keeps the old run folder aside)")
        return None
