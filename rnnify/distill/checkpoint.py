"""Run state on disk: per-stage checkpoints (trainable weights, optimizer, scheduler, step) and the
weights at the end of each finished stage. Every write goes to a temporary name first, then one rename,
so an interrupted run always leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class RunState:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.state_file = self.dir / "state.json"

    # ---- stages ----------------------------------------------------------------------------------------
    def load(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"completed": []}

    def completed(self) -> list[str]:
        return self.load()["completed"]

    def stage_weights(self, name: str) -> Path:
        return self.dir / "stages" / name / "model.safetensors"

    def load_stage_weights(self, name: str, model) -> None:
        load_model(model, str(self.stage_weights(name)), strict=True)

    def mark_completed(self, name: str, model, info: dict) -> None:
        path = self.stage_weights(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_model(model, str(tmp))  # handles tied weights (embeddings / lm_head)
        os.replace(tmp, path)
        data = self.load()
        if name not in data["completed"]:
            data["completed"].append(name)
        data.setdefault("stages", {})[name] = info
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.state_file, data)
        shutil.rmtree(self.dir / "checkpoints" / name, ignore_errors=True)

    def reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- checkpoints inside a stage ----------------------------------------------------------------------
    def checkpoints(self, stage: str) -> list[Path]:
        root = self.dir / "checkpoints" / stage
        if not root.exists():
            return []
        return sorted((p for p in root.glob("step-*") if (p / "meta.json").exists()), key=lambda p: int(p.name[5:]))

    def save_checkpoint(self, stage: str, step: int, trainable: dict, optimizer, scheduler, extra: dict, keep: int):
        root = self.dir / "checkpoints" / stage
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:07d}"
        tmp = root / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / "optim.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints(stage)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read_checkpoint(path: Path):
        meta = json.loads((path / "meta.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optim.pt", weights_only=False)
        return meta, trainable, optim
