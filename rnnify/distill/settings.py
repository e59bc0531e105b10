"""Settings of the training stages, one pydantic model per stage type (unknown keys are errors).

``StageSettings`` holds what every stage has (data, optimiser, schedule, budget, batch shape, checkpoints); each
stage type adds its own (``DistillSettings``: temperature, KL direction, stepwise layers; ``FinetuneSettings``:
LoRA). A recipe's ``train:`` block gives defaults: each stage takes the ones its type accepts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = True


class RecurrenceSpec(Strict):
    """Loop counts for training a model with a recurrent block (McLeish et al. 2025 sec. 3; Geiping et al. 2025 sec.
    3.3): per step, rate ~ LogNormal(log(mean - 1) - sigma^2 / 2, sigma) and loops = Poisson(rate) + 1 (so the mean
    loop count is ``mean``), drawn from (seed, step) so every process draws the same; only the last ``backprop`` loops
    keep gradients. ``ramp``: share of the steps over which the mean rises from 1 to ``mean`` (0: no curriculum),
    ``linear`` or ``1-sqrt``."""

    mean: float = Field(4.0, ge=1)
    sigma: float = Field(0.5, ge=0)
    max_loops: int | None = Field(None, ge=1)
    backprop: int = Field(8, ge=1)
    ramp: float = Field(0.0, ge=0, le=1)
    ramp_shape: Literal["linear", "1-sqrt"] = "linear"


class StageSettings(Strict):
    """What every stage type accepts."""

    # a key in ``datasets``, or a weighted mixture of them ({mix: 0.8, wikitext: 0.2}: distill/mixture.py);
    # default: the first
    data: str | dict[str, float] | None = None
    # where in its data the stage starts. continue: a run from a trained model (``conversion.start_from``) reads on
    # from where that model's training stopped in the same text, so a post-training (StateX) sees text the model has
    # not (pipeline/data_read.py); a run that converts afresh starts at the first block either way. beginning: the
    # first block always (each stage of one run starts there, as they share the run's data)
    data_start: Literal["continue", "beginning"] = "continue"
    trainable: list[str] | None = None  # glob patterns over parameter names; "@new" = the conversion's new parameters
    lr: float = Field(1e-3, gt=0)
    # learning rates by parameter name: {glob: lr}, the first matching glob wins, the rest take ``lr`` (under optimizer
    # muon: a Muon rate for the hidden matrices a glob matches, the rest of them take muon_lr). For the conversion's
    # per-head scalars (mixing logits, decay rates): Adam moves a parameter by about lr a step, so at lr 1e-3 a logit
    # started at -6 stays there through a short run (the quickstart's mix logits moved 0.05 in 27 steps)
    lr_by_name: dict[str, PositiveFloat] | None = None
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)  # share of the steps; used when warmup_steps is 0
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    seq_len: int = Field(512, ge=2)
    batch_size: int = Field(4, ge=1)  # sequences per optimizer micro-step, over all processes
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # recompute each decoder layer's activations in the backward pass (less memory, ~1/3 more compute)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    # a model with a recurrent block: loop counts drawn per step (None: the block's own count, all loops with grad)
    recurrence: RecurrenceSpec | None = None
    # the paper's optimiser choice for looped models: Muon for the hidden weight matrices, AdamW for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = Field(1e-3, gt=0)

    @model_validator(mode="after")
    def _betas(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)}: each must be in [0, 1)")
        return self


class AttentionTransferSettings(StageSettings):
    # train the converted layers in blocks of this many: each block's graph is rebuilt in the backward pass, so at
    # most one block's is alive (LoLCATs trained Llama 3.1 405B block by block, Zhang et al. 2024 sec. 3.3). The
    # loss is layer-local, so losses and weights equal training all at once; None: every layer's graph at once
    layers_per_block: int | None = Field(None, ge=1)


class LogitsStageSettings(StageSettings):
    """Stages whose loss is over the vocabulary (KL, CE)."""

    # positions per chunk of the loss: each chunk's logits, loss and gradients are taken and freed inside the head's
    # forward (distill/logits.py), so no [tokens x vocabulary] tensor is held whole. None: whole logits. 128 keeps a
    # chunk's logits near the size of the hidden states of a micro-batch of 1 x 1024-2048 tokens (SmolLM2: 25 MB per
    # fp32 tensor; Llama 3: 66 MB), while each chunk is still one large matrix product
    logits_chunk: int | None = Field(128, ge=1)


class DistillSettings(LogitsStageSettings):
    temperature: float = Field(1.0, gt=0)
    kl: Literal["forward", "reverse"] = "forward"
    ce_weight: float = Field(0.0, ge=0)
    # stepwise distillation (Mamba-in-Llama): only these converted layers use their new mixer in this stage;
    # the other converted layers run the teacher's attention. Give a list, or the attention fraction whose
    # converted layers are active (0.5 then 0.25 ... replaces layers progressively). "@new" then means the
    # active layers' new parameters.
    active_layers: list[int] | None = None
    active_attention_fraction: float | None = Field(None, ge=0, le=1)


class FinetuneSettings(LogitsStageSettings):
    lora: LoraSpec | None = None


class SelfDistillSettings(LogitsStageSettings):
    """Self-distillation (AHN, Fang et al. 2025 sec. 3.3): the teacher is the same model with full attention."""

    temperature: float = Field(1.0, gt=0)
    kl: Literal["forward", "reverse"] = "forward"
    ce_weight: float = Field(0.0, ge=0)  # + CE on the positions beyond the window
    layer_mse_weight: float = Field(0.0, ge=0)  # + per-layer MSE between L2-normalised pre-o_proj outputs
    # per-step sampling of the window and sinks (AHN: W with L/8 < W < L, sinks from a set, at most W/2);
    # None keeps the conversion's own window / sinks
    window_choices: list[int] | None = None
    sink_choices: list[int] | None = None

    @model_validator(mode="after")
    def _choices(self):
        for name in ("window_choices", "sink_choices"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < (1 if name == "window_choices" else 0)):
                raise ValueError(f"{name} {values}: give a non-empty list of "
                                 f"{'windows >= 1' if name == 'window_choices' else 'sink counts >= 0'}")
        if self.window_choices is not None and min(self.window_choices) >= self.seq_len:
            raise ValueError(f"window_choices {self.window_choices}: none is below seq_len {self.seq_len}, so no "
                             "token would leave the window; give windows < seq_len")
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
    streaming: bool = False  # read rows as training needs them (Hub: no full download first); first epoch in order



__all__ = ["AttentionTransferSettings", "DataSpec", "DistillSettings", "FinetuneSettings", "LogitsStageSettings",
           "LoraSpec", "RecurrenceSpec", "SelfDistillSettings", "StageSettings", "Strict"]
