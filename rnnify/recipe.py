"""Recipe schema (pydantic; unknown keys are rejected with their path) and ``key=value`` overrides.

A recipe names the source model, the conversion, the datasets, an ordered list of training stages, the
output and the evaluation. ``train:`` holds defaults every stage inherits; a stage overrides any of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RnnifyError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_PREFIX = "builtin:"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    source: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ConversionSpec(Strict):
    method: str
    keep_attention: list[int] | str | None = None
    attention_fraction: float | None = None  # share of layers kept as attention, spread evenly
    attention_every: int | None = None  # every k-th layer kept as attention
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_method(self):
        from .convert import resolve_options

        try:
            resolve_options(self.method, self.options)
        except RnnifyError as e:
            raise ValueError(str(e)) from None
        return self


class DataSpec(Strict):
    """A local text/jsonl/json/parquet file (or ``builtin:...``), or a Hub dataset name."""

    path: str
    name: str | None = None  # Hub dataset configuration
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = None  # chat data: apply the tokenizer's chat template to this field
    template: str | None = None  # text built from several columns, e.g. "{instruction}\n{input}\n{output}"
    format: Literal["auto", "text", "json", "parquet", "hub"] = "auto"
    max_rows: int | None = None
    streaming: bool = False  # Hub datasets: read rows as needed instead of downloading the whole set


class LoraSpec(Strict):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = True


class TrainSpec(Strict):
    """Settings a stage inherits from ``train:`` and may override."""

    data: str | None = None  # key in ``datasets``; default: the first
    trainable: list[str] | None = None  # glob patterns over parameter names; "@new" = the conversion's new parameters
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    max_steps: int | None = None
    max_tokens: int | None = None
    seq_len: int = 512
    batch_size: int = 4  # sequences per optimizer micro-step, over all processes
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    # distill
    temperature: float = 1.0
    kl: Literal["forward", "reverse"] = "forward"
    ce_weight: float = 0.0
    # finetune
    lora: LoraSpec | None = None
    # stepwise distillation (Mamba-in-Llama): only these converted layers use their new mixer in this stage;
    # the other converted layers run the teacher's attention. Give a list, or the attention fraction whose
    # converted layers are active (0.5 then 0.25 ... replaces layers progressively). "@new" then means the
    # active layers' new parameters.
    active_layers: list[int] | None = None
    active_attention_fraction: float | None = None

    @model_validator(mode="after")
    def _positive(self):
        for name in ("seq_len", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        return self


_TRAIN_FIELDS = set(TrainSpec.model_fields)


class StageSpec(Strict):
    type: str
    name: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data):
        """Stage keys other than type/name are TrainSpec overrides."""
        if not isinstance(data, dict):
            raise ValueError("a stage is a mapping with at least 'type'")
        data = dict(data)
        out = {k: data.pop(k) for k in ("type", "name", "settings") if k in data}
        settings = dict(out.get("settings", {}))
        unknown = sorted(set(data) - _TRAIN_FIELDS)
        if unknown:
            raise ValueError(f"unknown stage setting(s) {unknown}; accepted: {sorted(_TRAIN_FIELDS)}")
        settings.update(data)
        out["settings"] = settings
        return out

    @field_validator("type")
    @classmethod
    def _known_stage(cls, v):
        from .distill.stages import STAGES

        if v not in STAGES:
            raise ValueError(f"unknown stage type {v!r}; accepted: {', '.join(sorted(STAGES))}")
        return v


class OutputSpec(Strict):
    dir: str
    run_dir: str | None = None  # checkpoints and logs; default: <dir>.run
    overwrite: bool = False
    max_shard_size: str = "5GB"  # larger models are saved as shards + model.safetensors.index.json


class EvalSpec(Strict):
    text: str = "builtin:wikitext-2/test.txt"
    context_length: int = 2048
    num_windows: int = 4
    baseline: bool = True  # window + sinks softmax with the student's window (or 64 + 4)
    passkey_lengths: list[int] = Field(default_factory=lambda: [1024])
    passkey_trials: int = 5
    speed_lengths: list[int] = Field(default_factory=lambda: [512, 2048])
    speed_new_tokens: int = 32
    teacher: bool = True


class HubSpec(Strict):
    repo_id: str | None = None
    push: bool = False
    private: bool = False
    revision: str = "main"

    @model_validator(mode="after")
    def _repo(self):
        from .hub import check_repo_id

        if self.push and not self.repo_id:
            raise ValueError("push is true but repo_id is not set")
        if self.repo_id:
            try:
                check_repo_id(self.repo_id)
            except RnnifyError as e:
                raise ValueError(str(e)) from None
        return self


class Recipe(Strict):
    name: str = "recipe"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    conversion: ConversionSpec
    datasets: dict[str, DataSpec] = Field(default_factory=dict)
    train: TrainSpec = Field(default_factory=TrainSpec)
    stages: list[StageSpec] = Field(default_factory=list)
    output: OutputSpec
    eval: EvalSpec | None = None
    hub: HubSpec = Field(default_factory=HubSpec)

    @model_validator(mode="after")
    def _check(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for i, s in enumerate(self.stages):
            data = self.stage_settings(i).data
            if data is None and not self.datasets:
                raise ValueError(f"stage {s.name!r} needs data: add a 'datasets' entry")
            if data is not None and data not in self.datasets:
                raise ValueError(f"stage {s.name!r} uses data {data!r}, not in datasets {sorted(self.datasets)}")
            st = self.stage_settings(i)
            if st.max_steps is None and st.max_tokens is None:
                raise ValueError(f"stage {s.name!r} needs max_steps or max_tokens")
        return self

    def model_post_init(self, _ctx):
        for i, s in enumerate(self.stages):
            if s.name is None:
                s.name = s.type if [t.type for t in self.stages].count(s.type) == 1 else f"{s.type}{i}"

    def stage_settings(self, i: int) -> TrainSpec:
        merged = {**self.train.model_dump(exclude_unset=False), **self.stages[i].settings}
        return TrainSpec(**merged)

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
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
    raise RnnifyError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe; shipped: {names}")


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


def resolve_path(path: str) -> str:
    """``builtin:wikitext-2/valid.txt`` -> the copy shipped inside the package; other paths unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        p = DATA_DIR / path[len(BUILTIN_PREFIX):]
        if not p.exists():
            shipped = ", ".join(sorted(str(x.relative_to(DATA_DIR)) for x in DATA_DIR.rglob("*.txt")))
            raise RnnifyError(f"{path}: no such built-in file; shipped: {shipped}")
        return str(p)
    return path


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", exclude_none=False)
    return yaml.safe_dump(data, sort_keys=False)
