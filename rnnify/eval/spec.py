"""What an evaluation measures (the recipe's ``eval:`` block and ``rnnify eval``'s flags)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    text: str = "builtin:wikitext-2/test.txt"
    context_length: int = Field(2048, ge=2)
    num_windows: int = Field(4, ge=1)
    baseline: bool = True  # the window-only model with the student's window + sinks (or 64 + 4), same kept layers
    passkey_lengths: list[int] = Field(default_factory=lambda: [1024])
    passkey_trials: int = Field(5, ge=1)
    speed_lengths: list[int] = Field(default_factory=lambda: [512, 2048])
    speed_new_tokens: int = Field(32, ge=2)
    teacher: bool = True


__all__ = ["EvalSpec"]
