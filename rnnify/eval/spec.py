"""What an evaluation measures (the recipe's ``eval:`` block and ``rnnify eval``'s flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..paths import resolve_path
from .recall import KEYS


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    text: str | list[str] = "builtin:wikitext-2/test.txt"  # one text, or several (perplexity on each, side by side)
    optional_text: list[str] = Field(default_factory=list)  # also measured where the file exists (else skipped, said)
    context_length: int | list[int] = 2048  # one length, or several (a perplexity row each)
    num_windows: int = Field(4, ge=1)
    baseline: bool = True  # the window-only model with the student's window + sinks (or 64 + 4), same kept layers
    passkey_lengths: list[int] = Field(default_factory=lambda: [1024])
    passkey_trials: int = Field(5, ge=1)
    speed_lengths: list[int] = Field(default_factory=lambda: [512, 2048])
    speed_new_tokens: int = Field(32, ge=2)
    teacher: bool = True
    recurrence: list[int] | None = None  # looped models: perplexity and FLOPs per token at each loop count
    mqar_pairs: list[int] = Field(default_factory=list)  # multi-query associative recall at these numbers of pairs
    mqar_trials: int = Field(4, ge=1)
    # the prompts' seed: every model in one eval answers the same prompts; another seed judges them again on fresh ones
    mqar_seed: int = Field(0, ge=0)
    continuations: int = Field(4, ge=0)  # greedy continuations compared with the teacher's (0: none)
    continuation_tokens: int = Field(16, ge=1)
    tasks: list[str] = Field(default_factory=list)  # lm-evaluation-harness tasks (pip install 'rnnify[eval]')
    include_path: str | None = None  # a folder of task YAMLs, as the harness's own --include_path
    task_limit: int | None = Field(None, ge=1)  # examples per task (None: all)

    @field_validator("recurrence")
    @classmethod
    def _loops(cls, v):
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"loop counts {v}: accepted: integers >= 1")
        return v

    @field_validator("context_length")
    @classmethod
    def _contexts(cls, v):
        values = v if isinstance(v, list) else [v]
        if not values or min(values) < 2:
            raise ValueError(f"context lengths {values}: accepted: token counts >= 2")
        return v

    @field_validator("text")
    @classmethod
    def _texts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("no text given; accepted: a text file, builtin:wikitext-2/test.txt, or a list of them")
        return v

    @property
    def texts(self) -> list[str]:
        """The texts perplexity is measured on (``optional_text`` where the file exists); the first is the one the
        other measurements read."""
        given = self.text if isinstance(self.text, list) else [self.text]
        return given + [t for t in self.optional_text if Path(resolve_path(t)).is_file() and t not in given]

    @property
    def missing_optional_texts(self) -> list[str]:
        return [t for t in self.optional_text if not Path(resolve_path(t)).is_file()]

    @property
    def context_lengths(self) -> list[int]:
        return self.context_length if isinstance(self.context_length, list) else [self.context_length]

    @field_validator("mqar_pairs")
    @classmethod
    def _pairs(cls, v):
        bad = [n for n in v if not 1 <= n <= len(KEYS)]
        if bad:
            raise ValueError(f"numbers of pairs {bad}: accepted: 1 to {len(KEYS)}")
        return v

    @field_validator("passkey_lengths", "speed_lengths")
    @classmethod
    def _lengths(cls, v):
        bad = [n for n in v if n < 16]
        if bad:
            raise ValueError(f"lengths {bad} are too short; accepted: token counts >= 16")
        return v


__all__ = ["EvalSpec"]
