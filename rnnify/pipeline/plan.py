"""A recipe resolved once into what a run does: its folders, the stages with their typed settings, data and step
counts, and which of them this invocation runs. ``run_recipe``'s steps, ``rnnify validate`` and the memory plan read
it instead of going back into the recipe schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..distill.settings import DataSpec
from ..distill.stages import STAGES, Stage
from ..distill.trainer import total_steps
from ..errors import RnnifyError
from ..recipe import Recipe


@dataclass(frozen=True)
class PlannedStage:
    index: int
    name: str
    type: str
    spec: Stage  # the registered stage: objective builder, whether it needs the teacher
    settings: object  # the stage's typed settings (train: defaults, then its own)
    data_key: str  # the dataset's key, or the mixture in words ("mix 80% + wikitext 20%")
    data: dict[str, tuple[DataSpec, float]]  # key -> (source, weight); one entry unless a mixture
    steps: int

    @property
    def blocks(self) -> int:
        """Token blocks the stage reads (steps x batch x accumulation)."""
        return self.steps * self.settings.batch_size * self.settings.grad_accum

    @property
    def tokens(self) -> int:
        return self.blocks * self.settings.seq_len

    def describe(self) -> str:
        return (f"stage {self.name} ({self.type}): {self.steps} steps, {self.tokens:,} tokens, "
                f"lr {self.settings.lr:g}, seq_len {self.settings.seq_len}")


@dataclass(frozen=True)
class RunPlan:
    recipe: Recipe
    run_dir: Path
    out: Path
    stages: tuple[PlannedStage, ...]
    only_stage: str | None = None
    resume: bool = False
    fresh: bool = False

    @classmethod
    def of(cls, recipe: Recipe, *, only_stage: str | None = None, resume: bool = False, fresh: bool = False):
        names = [s.name for s in recipe.stages]
        if only_stage is not None and only_stage not in names:
            raise RnnifyError(f"--stage {only_stage!r} is not in this recipe; its stages: {', '.join(names)}")
        if fresh and (resume or only_stage is not None):
            raise RnnifyError("--fresh starts the recipe from the beginning; it cannot go with --resume or --stage")
        stages = []
        for i, stage in enumerate(recipe.stages):
            settings = recipe.stage_settings(i)
            chosen = settings.data or next(iter(recipe.datasets))
            weights = {chosen: 1.0} if isinstance(chosen, str) else chosen
            total = sum(weights.values())
            data = {k: (recipe.datasets[k], w / total) for k, w in weights.items()}
            label = chosen if isinstance(chosen, str) else " + ".join(f"{k} {w:.0%}" for k, (_, w) in data.items())
            stages.append(PlannedStage(index=i, name=stage.name, type=stage.type, spec=STAGES[stage.type],
                                       settings=settings, data_key=label, data=data, steps=total_steps(settings)))
        return cls(recipe=recipe, run_dir=recipe.run_dir(), out=Path(recipe.output.dir), stages=tuple(stages),
                   only_stage=only_stage, resume=resume, fresh=fresh)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def starts_afresh(self) -> bool:
        """Neither --resume nor --stage: the output folder and any earlier run folder are checked first."""
        return not self.resume and self.only_stage is None

    @property
    def needs_teacher(self) -> bool:
        """Whether the source must stay loaded beside the student while training (a stage distils from it, or the
        kept layers are chosen after a stage by scoring against it)."""
        return bool(self.recipe.conversion.select_after) or any(s.spec.needs_teacher for s in self.stages)

    def to_run(self, completed: list[str]) -> list[PlannedStage]:
        """The stages this invocation runs, given those the run folder has finished."""
        if self.only_stage is not None:
            return [s for s in self.stages if s.name == self.only_stage]
        return [s for s in self.stages if s.name not in completed]

    def prior(self, completed: list[str]) -> list[str]:
        """Finished stages before the first one to run: the student starts from the last of them."""
        first = self.names.index(self.only_stage) if self.only_stage else \
            next((i for i, n in enumerate(self.names) if n not in completed), len(self.names))
        return [n for n in self.names[:first] if n in completed]

    def describe(self) -> list[str]:
        """The plan in words (``rnnify validate``)."""
        c = self.recipe.conversion
        kept = (f"attention fraction {c.attention_fraction}" if c.attention_fraction is not None else
                f"every {c.attention_every}th layer" if c.attention_every else c.keep_attention or "none")
        start = (f"start from {c.start_from} ({c.method} conversion of {self.recipe.model.source})" if c.start_from
                 else f"convert {self.recipe.model.source} with {c.method} (layers kept as attention: {kept})")
        lines = [start + "".join(f", then {t.method} {t.options}" for t in c.transforms)]
        lines += [s.describe() + (f", reading on past what {c.start_from}'s training read of its data"
                                  if c.start_from and s.settings.data_start == "continue" else "")
                  for s in self.stages]
        lines.append(f"then {'evaluate and ' if self.recipe.eval else ''}save to {self.out} (run state in {self.run_dir})")
        return lines


__all__ = ["RunPlan", "PlannedStage"]
