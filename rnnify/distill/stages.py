"""Training stages, registered by name. Each builds an ``Objective``: a module whose forward maps a batch of
token blocks to ``(loss, metrics)``, so the generic loop (and DDP) wraps it whole."""

from __future__ import annotations

import contextlib
import fnmatch
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import spread_layers
from ..convert.teacher_attention import TeacherAttention, attention_io
from ..errors import RnnifyError
from ..modeling import RnnifyForCausalLM
from .logits import VocabLoss
from .recompute import recomputed
from .recurrence import forward_kwargs
from .settings import AttentionTransferSettings, DistillSettings, FinetuneSettings, SelfDistillSettings, StageSettings


class Objective(nn.Module):
    def __init__(self, student, teacher=None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.seed, self.step = 0, 0
        self.recurrence, self.total_steps = None, 1  # set by build_objective for models with a recurrent block
        self.student_kwargs: dict = {}
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def set_step(self, seed: int, step: int) -> None:
        """Called by the trainer before each optimizer step: per-step choices (loop counts, windows) are drawn from
        (seed, step), so every process draws the same."""
        self.seed, self.step = seed, step
        self.student_kwargs = forward_kwargs(self.recurrence, seed, step, self.total_steps)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self


class AttentionTransferObjective(Objective):
    """Per layer, MSE between the teacher attention's output and the student mixer's output on the same
    inputs (LoLCATs stage 1, Zhang et al. 2024 eq. 7; Mamba-in-Llama's stepwise alignment). The teacher's
    hidden states feed every mixer, so layers train independently and in parallel."""

    def __init__(self, student, teacher, layers_per_block: int | None = None):
        super().__init__(student, teacher)
        self.layers = [i for i, _ in student.mixers()]
        if not self.layers:
            raise RnnifyError("attention_transfer: the model has no converted layers to train")
        k = layers_per_block or len(self.layers)
        self.blocks = [self.layers[a:a + k] for a in range(0, len(self.layers), k)]

    def _block_losses(self, block, captured):
        losses = []
        for i in block:
            h, pe, target = captured[i]
            out, _ = self.student.model.layers[i].self_attn(h, position_embeddings=pe, attention_mask=None)
            losses.append(torch.mean((out.float() - target.float()) ** 2))
        return torch.stack(losses)

    def forward(self, input_ids):
        captured = attention_io(self.teacher, self.layers, input_ids)
        if len(self.blocks) == 1:  # every layer's graph at once
            losses = self._block_losses(self.layers, captured)
        else:  # one block's graph at a time: each block is run again in the backward pass
            losses = torch.cat([recomputed(lambda c, block=block: self._block_losses(block, c),
                                           {i: captured[i] for i in block}) for block in self.blocks])
        return losses.mean(), {"mse_first": losses[0].item(), "mse_last": losses[-1].item()}


class DistillObjective(Objective):
    """End-to-end KL to the frozen teacher (+ optional CE weight). With ``active`` set, converted layers
    outside it run the teacher's attention (stepwise distillation, Mamba-in-Llama sec. 3)."""

    def __init__(self, student, teacher, temperature=1.0, kl="forward", ce_weight=0.0, active=None,
                 logits_chunk: int | None = None):
        super().__init__(student, teacher)
        self.temperature, self.kl, self.ce_weight = temperature, kl, ce_weight
        self.vocab = VocabLoss(logits_chunk)
        converted = [i for i, _ in student.mixers()] if hasattr(student, "mixers") else []
        self.inactive = [i for i in converted if active is not None and i not in active]

    @contextlib.contextmanager
    def _stepwise(self):
        """The converted layers outside ``active`` run the teacher's attention while inside."""
        layers = self.student.model.layers
        saved = {i: layers[i].self_attn for i in self.inactive}
        try:
            for i in self.inactive:
                layers[i].self_attn = TeacherAttention(self.teacher.model.layers[i].self_attn)
            yield
        finally:
            for i, m in saved.items():
                layers[i].self_attn = m

    def student_logits(self, input_ids):
        """The student's whole logits as this stage runs it (inactive layers as the teacher's attention)."""
        with self._stepwise():
            return self.student(input_ids=input_ids, use_cache=False, **self.student_kwargs).logits

    def _student_loss(self, input_ids, teacher, mask, labels):
        with self._stepwise():
            return self.vocab.loss(self.student, input_ids, teacher, kl_mask=mask, labels=labels,
                                   temperature=self.temperature, direction=self.kl, ce_weight=self.ce_weight,
                                   **self.student_kwargs)

    def forward(self, input_ids, labels=None):
        labels = input_ids if labels is None else labels
        with torch.no_grad():
            t_out = self.vocab.teacher_outputs(self.teacher, input_ids)
        loss, kl, ce = self._student_loss(input_ids, t_out, labels != -100, labels if self.ce_weight else None)
        metrics = {"kl": kl.item()}
        if self.ce_weight:
            metrics["ce"] = ce.item()
        return loss, metrics


class FinetuneObjective(Objective):
    """Next-token cross-entropy (SUPRA uptraining; LoLCATs stage 2 with LoRA)."""

    def __init__(self, student, logits_chunk: int | None = None):
        super().__init__(student)
        self.vocab = VocabLoss(logits_chunk)

    def forward(self, input_ids, labels=None):
        labels = input_ids if labels is None else labels
        loss, _, ce = self.vocab.loss(self.student, input_ids, labels=labels, **self.student_kwargs)
        return loss, {"ce": ce.item()}


class SelfDistillObjective(Objective):
    """Self-distillation (AHN, Fang et al. 2025 sec. 3.3): the teacher is the same model with every converted layer
    run as the source attention (full causal softmax, no memory), so the weights are held once. Forward KL (at a
    temperature) on the positions beyond the window + sinks, where the memory has something to add; optionally CE
    there and a per-layer MSE between L2-normalised pre-``o_proj`` outputs. The window and sinks may be drawn per step
    (AHN: W with L/8 < W < L, sinks at most W/2 from a set; for short CPU sequences, where no candidate satisfies
    L/8 < W, any candidate below L is drawn)."""

    def __init__(self, student, settings):
        super().__init__(student, None)
        student.set_source_view(False)  # fails now, with the reason, when a mixer cannot be its own teacher
        self.s = settings
        self.vocab = VocabLoss(settings.logits_chunk)
        self.mixers = [m for _, m in student.mixers()]
        self.window0 = [(m.window, m.sinks) for m in self.mixers]

    def draw(self, L: int) -> tuple[int | None, int | None]:
        if self.s.window_choices is None and self.s.sink_choices is None:
            return None, None
        rng = random.Random(self.seed * 1_000_003 + self.step)
        W = None
        if self.s.window_choices is not None:
            fits = [w for w in self.s.window_choices if L / 8 < w < L] or [w for w in self.s.window_choices if w < L]
            W = rng.choice(fits)
        S = None
        if self.s.sink_choices is not None:
            cap = (W or min(w for w, _ in self.window0)) / 2
            S = rng.choice([c for c in self.s.sink_choices if c <= cap] or [0])
        return W, S

    def _set(self, W, S):
        for m, (w0, s0) in zip(self.mixers, self.window0):
            m.window = w0 if W is None else W
            m.sinks = s0 if S is None else S

    def _capture(self, store):
        """Hooks that keep each converted layer's pre-o_proj output (L2-normalised)."""
        hooks = []
        for m in self.mixers:
            hooks.append(m.o_proj.register_forward_hook(
                lambda mod, args, out: store.append(F.normalize(args[0].float(), dim=-1))))
        return hooks

    def forward(self, input_ids, labels=None):
        labels = input_ids if labels is None else labels
        self.vocab.check(self.student, input_ids)  # its forward before the layer captures below
        W, S = self.draw(input_ids.shape[1])
        self._set(W, S)
        window, sinks = self.mixers[0].window, self.mixers[0].sinks
        beyond = torch.zeros_like(labels, dtype=torch.bool)
        beyond[:, window + sinks:] = True  # earlier positions see no evicted token: student == teacher there
        mask = beyond & (labels != -100)
        mse = self.s.layer_mse_weight > 0
        targets, preds = [], []
        try:
            hooks = self._capture(targets) if mse else []
            try:
                with torch.no_grad():
                    self.student.set_source_view(True)
                    t_out = self.vocab.teacher_outputs(self.student, input_ids)
            finally:
                self.student.set_source_view(False)
                for h in hooks:
                    h.remove()
            hooks = self._capture(preds) if mse else []
            try:
                loss, kl, ce = self.vocab.loss(
                    self.student, input_ids, t_out, kl_mask=mask,
                    labels=labels.masked_fill(~beyond, -100) if self.s.ce_weight else None,
                    temperature=self.s.temperature, direction=self.s.kl, ce_weight=self.s.ce_weight)
            finally:
                for h in hooks:
                    h.remove()
        finally:
            self._set(None, None)
        metrics = {"kl": kl.item(), "window": window, "sinks": sinks}
        if self.s.ce_weight:
            metrics["ce"] = ce.item()
        if mse:
            cut = window + sinks
            layer_mse = torch.stack([((p[:, cut:] - t[:, cut:]) ** 2).mean() for p, t in zip(preds, targets)])
            loss, metrics["layer_mse"] = loss + self.s.layer_mse_weight * layer_mse.mean(), layer_mse.mean().item()
        return loss, metrics


@dataclass(frozen=True)
class Stage:
    """A training stage type: its settings model, what it trains by default and how it builds its objective."""

    name: str
    summary: str
    settings: type[StageSettings]
    needs_teacher: bool
    trainable: tuple[str, ...]  # default trainable patterns ("@new": the conversion's new parameters)
    objective: Callable  # (student, teacher, settings, active layers) -> Objective


# The registry: one entry per stage type.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("attention_transfer", "per-layer MSE between each new mixer and the attention it replaces (LoLCATs stage 1)",
          AttentionTransferSettings, True, ("@new",),
          lambda st, te, se, ac: AttentionTransferObjective(st, te, se.layers_per_block)),
    Stage("distill", "end-to-end KL to the frozen teacher (+ CE); stepwise with active_layers",
          DistillSettings, True, ("@new",),
          lambda st, te, se, ac: DistillObjective(st, te, se.temperature, se.kl, se.ce_weight, ac, se.logits_chunk)),
    Stage("finetune", "next-token cross-entropy, all parameters or LoRA (peft)",
          FinetuneSettings, False, ("*",), lambda st, te, se, ac: FinetuneObjective(st, se.logits_chunk)),
    Stage("self_distill", "KL to the same weights with full attention, beyond the window (AHN); the memory trains",
          SelfDistillSettings, False, ("@new",), lambda st, te, se, ac: SelfDistillObjective(st, se)),
)}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise RnnifyError(f"unknown stage type {name!r}; accepted: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def build_objective(stage_type: str, student, teacher, settings, active=None, total_steps: int = 1) -> Objective:
    objective = get_stage(stage_type).objective(student, teacher, settings, active)
    spec = getattr(settings, "recurrence", None)
    if spec is not None:
        model = next((m for m in student.modules() if isinstance(m, RnnifyForCausalLM)), None)  # through peft
        if model is None or not len(model.blocks):
            raise RnnifyError(f"stage {stage_type}: recurrence is set but the model has no recurrent block (convert "
                              "with --method retrofit, or drop the stage's recurrence setting)")
    objective.recurrence, objective.total_steps = spec, total_steps
    return objective


def active_layers(student, settings) -> list[int] | None:
    """The converted layers a stage trains (None: all of them)."""
    converted = [i for i, _ in student.mixers()]
    chosen = getattr(settings, "active_layers", None)
    fraction = getattr(settings, "active_attention_fraction", None)
    if chosen is not None:
        bad = sorted(set(chosen) - set(converted))
        if bad:
            raise RnnifyError(f"active_layers {bad} are not converted layers; converted: {converted}")
        return sorted(chosen)
    if fraction is not None:
        kept = set(spread_layers(len(student.model.layers), fraction))
        return [i for i in converted if i not in kept]
    return None


def select_trainable(model, patterns: list[str], new_names: list[str], keep_existing: bool = False) -> list[str]:
    """Set requires_grad from glob patterns over parameter names ('@new' = the conversion's new parameters).
    With ``keep_existing`` the parameters that already train (LoRA adapters) keep training too.

    Returns the names that train; fails when nothing matches.
    """
    names = [n for n, _ in model.named_parameters()]
    chosen = set()
    for pat in patterns:
        if pat == "@new":
            chosen |= {n for n in names if any(n.endswith(x) for x in new_names)}
        else:
            chosen |= {n for n in names if fnmatch.fnmatchcase(n, pat)}
    if not chosen:
        examples = ", ".join(names[:3] + new_names[:2])
        raise RnnifyError(f"trainable patterns {patterns} match no parameter; names look like: {examples}")
    if keep_existing:
        chosen |= {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return sorted(chosen)
