"""Recipe schema (pydantic; unknown keys are rejected with their path) and ``key=value`` overrides.

A recipe names the source model, the conversion, the datasets, an ordered list of training stages, the
output and the evaluation. ``train:`` holds defaults every stage inherits; a stage overrides any of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from .convert import get_method
from .convert.auto_spec import parse_auto
from .convert.method import Conversion, Transform
from .distill.settings import DataSpec, Strict
from .distill.stages import STAGES
from .errors import RnnifyError
from .eval.spec import EvalSpec
from .hub import check_repo_id, check_revision
from .paths import RECIPES_DIR
from .units import parse_bytes


class ModelSpec(Strict):
    source: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TransformSpec(Strict):
    """A transform method applied to the converted model, before training."""

    method: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_transform(self):
        try:
            m = get_method(self.method)
            if not isinstance(m, Transform):
                raise RnnifyError(f"method {self.method!r} is a conversion, not a transform; put it under "
                                  "conversion.method")
            m.resolve_options(self.options)
        except RnnifyError as e:
            raise ValueError(str(e)) from None
        return self


class ConversionSpec(Strict):
    method: str
    keep_attention: list[int] | str | None = None  # a list, "0-3,15", or auto:N / auto:P%@L (chosen by measurement)
    select_text: str = "builtin:wikitext-2/valid.txt"  # the text auto:... scores layers on
    select_mode: Literal["restore", "convert"] = "restore"  # how auto:... scores (convert/layer_select.py)
    select_tokens: int = Field(4096, ge=64)  # tokens of select_text that auto:... scores on
    # auto:... scores the model this stage trained (every layer converted until then) instead of the untrained one;
    # the chosen layers then return to the teacher's attention for the later stages
    select_after: str | None = None
    attention_fraction: float | None = None  # share of layers kept as attention, spread evenly
    attention_every: int | None = None  # every k-th layer kept as attention
    options: dict[str, Any] = Field(default_factory=dict)
    transforms: list[TransformSpec] = Field(default_factory=list)  # applied in order after the conversion
    # a model this recipe's method already converted from model.source (a folder `rnnify run`/`convert` wrote, or a
    # Hub id): the student starts from its weights instead of a fresh conversion, then takes the transforms (StateX
    # post-trains a trained recurrent model); model.source stays the teacher
    start_from: str | None = None

    @model_validator(mode="after")
    def _known_method(self):
        try:
            m = get_method(self.method)  # a transform here rewrites a source that is already converted
            m.resolve_options(self.options)
            auto = parse_auto(self.keep_attention)
        except RnnifyError as e:
            raise ValueError(str(e)) from None
        if self.start_from is not None:
            given = {k: getattr(self, k) for k in ("keep_attention", "select_after", "attention_fraction",
                                                   "attention_every") if getattr(self, k) not in (None, "")}
            if isinstance(m, Transform) or given or self.options:
                raise ValueError(f"start_from: {self.start_from!r} is already converted: conversion.method names "
                                 "the method it was converted with, and only transforms may be added; drop "
                                 f"{', '.join([*given, *(['options'] if self.options else [])]) or 'the transform method'}"
                                 " (transforms go under conversion.transforms)")
        if self.select_after is not None and auto is None:
            raise ValueError(f"select_after: {self.select_after!r} chooses the kept layers by measurement after that "
                             f"stage; keep_attention must then be auto:N or auto:P%@L, not {self.keep_attention!r}")
        return self


class StageSpec(Strict):
    """One stage: its type, an optional name, and its own settings (checked against its type's settings model)."""

    type: str
    name: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data):
        """Stage keys other than type/name are that stage type's settings."""
        if not isinstance(data, dict):
            raise ValueError("a stage is a mapping with at least 'type'")
        data = dict(data)
        out = {k: data.pop(k) for k in ("type", "name", "settings") if k in data}
        settings = dict(out.get("settings", {}))
        settings.update(data)
        out["settings"] = settings
        return out

    @field_validator("type")
    @classmethod
    def _known_stage(cls, v):
        if v not in STAGES:
            raise ValueError(f"unknown stage type {v!r}; accepted: {', '.join(sorted(STAGES))}")
        return v


def _stage_keys() -> dict[str, list[str]]:
    """setting -> the stage types that accept it."""
    keys: dict[str, list[str]] = {}
    for name, stage in STAGES.items():
        for key in stage.settings.model_fields:
            keys.setdefault(key, []).append(name)
    return keys


def _train_defaults_model():
    """The ``train:`` block: every stage type's settings, all optional (a stage takes those its type accepts)."""
    fields = {}
    for stage in STAGES.values():
        for key, info in stage.settings.model_fields.items():
            fields.setdefault(key, (info.annotation | None, None))
    return create_model("TrainDefaults", __base__=Strict, **fields)


TrainDefaults = _train_defaults_model()


class OutputSpec(Strict):
    dir: str
    run_dir: str | None = None  # checkpoints and logs; default: <dir>.run
    overwrite: bool = False
    max_shard_size: str = "5GB"  # larger models are saved as shards + model.safetensors.index.json (GB = 10^9 bytes)

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v):
        parse_bytes(v, "max_shard_size", bare_bytes=True)  # refused here, before a run trains for hours
        return v


class HubSpec(Strict):
    repo_id: str | None = None
    push: bool = False
    private: bool = False
    revision: str = "main"

    @model_validator(mode="after")
    def _repo(self):
        if self.push and not self.repo_id:
            raise ValueError("push is true but repo_id is not set")

        try:
            check_revision(self.revision)
        except RnnifyError as e:
            raise ValueError(str(e)) from None
        if self.repo_id:
            try:
                check_repo_id(self.repo_id)
            except RnnifyError as e:
                raise ValueError(str(e)) from None
        return self


class DistributedSpec(Strict):
    """How several processes share the training (``torchrun`` / ``accelerate launch``). ``ddp``: every process
    holds the whole teacher and student; ``fsdp``: PyTorch's FSDP2 shards them (each process holds 1/N of the
    parameters, gradients and optimiser state; see ``distill/sharding.py``); ``auto``: fsdp when ``accelerate
    launch`` was given an FSDP config (``recipes/accelerate/fsdp.yaml``), else ddp."""

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    shard_teacher: bool = True  # the frozen teacher's layers sharded too (else whole on every process)
    reshard_after_forward: bool = True  # free gathered layers after their forward (ZeRO-3); false: keep (ZeRO-2)


class Recipe(Strict):
    name: str = "recipe"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    conversion: ConversionSpec
    datasets: dict[str, DataSpec] = Field(default_factory=dict)
    train: TrainDefaults = Field(default_factory=TrainDefaults)
    stages: list[StageSpec] = Field(default_factory=list)
    output: OutputSpec
    eval: EvalSpec | None = None
    hub: HubSpec = Field(default_factory=HubSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    # what `rnnify run --control` runs beside this recipe to show what it buys (pipeline/control.py): the same run
    # without conversion.transforms (the default when there are any), or the same conversion untrained (otherwise)
    control: Literal["without_transforms", "untrained"] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.control == "without_transforms" and not self.conversion.transforms:
            raise ValueError("control: without_transforms leaves out conversion.transforms, and this recipe has none; "
                             "accepted here: untrained (the same conversion, no training)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        after = self.conversion.select_after
        if after is not None and after not in names:
            raise ValueError(f"conversion.select_after: {after!r} is not a stage of this recipe; its stages: "
                             f"{', '.join(names) or 'none'}")
        accepted = _stage_keys()
        types = {s.type for s in self.stages}
        for key in self.train.model_fields_set:
            if types and getattr(self.train, key) is not None and not types & set(accepted[key]):
                raise ValueError(f"train.{key}: no stage of this recipe uses it; stages that accept it: "
                                 f"{', '.join(accepted[key])}")
        for i, s in enumerate(self.stages):
            wrong = sorted(k for k in s.settings if k in accepted and s.type not in accepted[k])
            if wrong:
                raise ValueError(f"stage {s.name!r} ({s.type}): " + "; ".join(
                    f"{k} is not a {s.type} setting (stages that accept it: {', '.join(accepted[k])})" for k in wrong))
            unknown = sorted(set(s.settings) - set(accepted))
            if unknown:
                raise ValueError(f"stage {s.name!r}: unknown stage setting(s) {unknown}; a {s.type} stage accepts: "
                                 f"{sorted(self._settings_model(i).model_fields)}")
            try:
                st = self.stage_settings(i)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"stage {s.name!r}: {where}: {err['msg']}") from None
            if st.data is None and not self.datasets:
                raise ValueError(f"stage {s.name!r} needs data: add a 'datasets' entry")
            for key in ([st.data] if isinstance(st.data, str) else list(st.data or {})):
                if key not in self.datasets:
                    raise ValueError(f"stage {s.name!r} uses data {key!r}, not in datasets {sorted(self.datasets)}")
            if isinstance(st.data, dict) and (not st.data or any(w <= 0 for w in st.data.values())):
                raise ValueError(f"stage {s.name!r}: data {st.data}: a mixture gives each dataset a weight above zero, "
                                 "e.g. {mix: 0.8, wikitext: 0.2}")
            if st.max_steps is None and st.max_tokens is None:
                raise ValueError(f"stage {s.name!r} needs max_steps or max_tokens")
            lora = getattr(st, "lora", None)
            if s.name == after and lora is not None and not lora.merge:
                raise ValueError(f"stage {s.name!r} is conversion.select_after: its LoRA adapters must be merged "
                                 "(lora.merge: true) before the layers are scored and the hybrid rebuilt")

            try:
                method = get_method(self.conversion.method)
                if isinstance(method, Conversion):  # a transform's options hold no window of its own
                    method.check_training(method.resolve_options(self.conversion.options), st.seq_len, s.name)
            except RnnifyError as e:
                raise ValueError(str(e)) from None
        return self

    def model_post_init(self, _ctx):
        for i, s in enumerate(self.stages):
            if s.name is None:
                s.name = s.type if [t.type for t in self.stages].count(s.type) == 1 else f"{s.type}{i}"

    def _settings_model(self, i: int):
        return STAGES[self.stages[i].type].settings

    def stage_settings(self, i: int):
        """The typed settings of stage ``i``: the ``train:`` defaults its type accepts, then its own."""
        model = self._settings_model(i)
        defaults = {k: v for k, v in self.train.model_dump(exclude_unset=True).items() if k in model.model_fields}
        return model(**{**defaults, **self.stages[i].settings})

    def run_dir(self) -> Path:
        return Path(self.output.run_dir or f"{self.output.dir.rstrip('/')}.run")


# ------------------------------------------------------------------------------------------------- loading
def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; list items by index (``stages.1.lr=3e-4``) or by stage name
    (``stages.distill.max_steps=10``). ``train.KEY=value`` sets KEY for every stage: it also drops the
    stages' own KEY, so ``train.max_steps=200`` means what it says."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RnnifyError(f"override {item!r} is not key=value (e.g. train.max_steps=200)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 2 and parts[0] == "train":
            for stage in data.get("stages") or []:
                if isinstance(stage, dict):
                    stage.pop(parts[1], None)
                    if isinstance(stage.get("settings"), dict):
                        stage["settings"].pop(parts[1], None)
        node = data
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                idx = None
                if part.lstrip("-").isdigit():
                    idx = int(part)
                else:
                    for n, entry in enumerate(node):
                        if isinstance(entry, dict) and (entry.get("name") or entry.get("type")) == part:
                            idx = n
                if idx is None or not -len(node) <= idx < len(node):
                    raise RnnifyError(f"override {key}: no list item {part!r} at {'.'.join(parts[:j]) or 'top'}")
                if last:
                    node[idx] = parse_value(value)
                else:
                    node = node[idx]
            else:
                if not isinstance(node, dict):
                    raise RnnifyError(f"override {key}: {'.'.join(parts[:j])} is not a mapping")
                if last:
                    node[part] = parse_value(value)
                else:
                    node = node.setdefault(part, {})
    return data


def find_recipe(name_or_path: str) -> Path:
    """A recipe file, a shipped recipe's name, or ``recipes/<name>.yaml`` (the shipped copy when no such file is
    here, e.g. outside a clone of the repository)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if p.parent.name == "recipes" and (RECIPES_DIR / p.name).is_file():
        return RECIPES_DIR / p.name
    names = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
    raise RnnifyError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe; shipped: {names}")


def shipped_recipes() -> list[tuple[str, str]]:
    """(name, its first comment line) of every recipe shipped in the package."""
    out = []
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line[1:].strip() for line in p.read_text().splitlines() if line.startswith("#")), "")
        out.append((p.stem, first))
    return out


def copy_recipe(name: str, dest: str, overwrite: bool = False) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or a folder to put it in) to edit; returns the copy."""
    src = find_recipe(name)
    if src.parent != RECIPES_DIR:
        raise RnnifyError(f"{name!r} is not a shipped recipe; see `rnnify ls`")
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not overwrite:
        raise RnnifyError(f"{target} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise RnnifyError(f"cannot write {target}: the folder {target.parent} does not exist")
    target.write_text(src.read_text())
    return target


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RnnifyError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise RnnifyError(f"{path}: a recipe is a YAML mapping")
    return recipe_from_dict(apply_overrides(data, overrides or []), str(path))


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe(**data)
    except ValidationError as e:
        raise RnnifyError(_format_errors(e, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", exclude_none=False)
    data["train"] = recipe.train.model_dump(mode="json", exclude_unset=True)  # only the defaults the recipe sets
    return yaml.safe_dump(data, sort_keys=False)
