"""The training loop of one stage, on accelerate: single process on CPU, DDP under torchrun or
``accelerate launch`` (gloo on CPU, NCCL on GPUs), or FSDP2 (``sharding.py``) when the recipe's
``distributed.strategy`` or the accelerate config asks for it.

Batches are drawn deterministically from (seed, stage, step), so a resumed run sees exactly the batches the
uninterrupted run would have, and every process takes its slice of the same global batch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import RnnifyError
from .checkpoint import RunState
from .sharding import ShardedStage, activation_checkpointing, fsdp_requested

# Test hook: called with the step about to run (lets tests simulate a crash at a given step).
_BEFORE_STEP = None
# Fault injection across processes (torchrun / accelerate launch tests): every process interrupts itself, as Ctrl-C
# would, before this step, after the checkpoint of the steps done so far is written.
_STOP_ENV = "RNNIFY_FAULT_INTERRUPT_AT_STEP"


@dataclass
class StageResult:
    steps: int
    tokens: int
    final_loss: float
    seconds: float
    teacher_sharded: bool = False  # the frozen teacher now lives in FSDP shards (the evaluation reloads it)


def total_steps(settings, world_size: int = 1) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    per_step = settings.batch_size * settings.grad_accum * settings.seq_len
    return max(1, math.ceil(settings.max_tokens / per_step))


def batch_indices(n_blocks: int, seed: int, step: int, micro: int, settings, in_order: bool = False) -> torch.Tensor:
    """Global indices of the blocks for (step, micro): consecutive slices of seeded per-epoch permutations.
    ``in_order``: the first epoch reads the blocks in order (a streaming source, whose size is unknown until it
    ends); later epochs are permuted like any other."""
    per = settings.batch_size
    start = (step * settings.grad_accum + micro) * per
    out = []
    while len(out) < per:
        epoch, offset = divmod(start + len(out), n_blocks)
        take = min(per - len(out), n_blocks - offset)
        if in_order and epoch == 0:
            out.extend(range(offset, offset + take))
            continue
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + take].tolist())
    return torch.tensor(out)


def _stage_batch_indices(blocks, seed: int, step: int, micro: int, settings) -> torch.Tensor:
    if getattr(blocks, "lazy", False):  # a streaming source: pack up to this batch's blocks first
        blocks.ensure((step * settings.grad_accum + micro + 1) * settings.batch_size)
        return batch_indices(len(blocks), seed, step, micro, settings, in_order=True)
    return batch_indices(blocks.shape[0], seed, step, micro, settings)


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the hidden weight matrices, AdamW for everything else (embeddings, LM head, norms,
    biases): the optimiser McLeish et al. 2025 train looped models with. One optimizer to the scheduler and the
    checkpoints; its param groups are its two parts' (so a learning-rate schedule scales both)."""

    def __init__(self, matrices: list[dict], others: list[dict], *, betas, weight_decay):
        """``matrices`` / ``others``: parameter groups, each with its ``lr``."""
        self.parts = []
        if matrices:
            self.parts.append(torch.optim.Muon(matrices, lr=matrices[0]["lr"], weight_decay=weight_decay))
        if others:
            self.parts.append(torch.optim.AdamW(others, lr=others[0]["lr"], betas=betas, weight_decay=weight_decay))
        super().__init__([p for o in self.parts for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in self.parts for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state_dict):
        for o, s in zip(self.parts, state_dict["parts"]):
            o.load_state_dict(s)
        self.param_groups = [g for o in self.parts for g in o.param_groups]


def lr_groups(named, settings, default_lr: float | None = None, trained_by: str = "this stage trains",
              check_unused: bool = True) -> list[dict]:
    """Parameter groups by learning rate: ``settings.lr_by_name`` globs in order (first match wins), then
    ``default_lr`` (the stage's ``lr``). A glob that matches no trainable parameter is an error (a misspelt name would
    silently train at ``lr``)."""
    patterns = settings.lr_by_name or {}
    groups = {pat: [] for pat in patterns}
    rest = []
    for n, p in named:
        pat = next((g for g in patterns if fnmatch.fnmatchcase(n, g)), None)
        (groups[pat] if pat is not None else rest).append(p)
    unused = [pat for pat, ps in groups.items() if not ps]
    if unused and check_unused:
        examples = ", ".join(n for n, _ in named[:3])
        raise RnnifyError(f"lr_by_name: {unused} match no parameter {trained_by}; its names look like: {examples}")
    out = [{"params": ps, "lr": patterns[pat]} for pat, ps in groups.items() if ps]
    return out + ([{"params": rest, "lr": settings.lr if default_lr is None else default_lr}] if rest else [])


def make_optimizer(student, settings):
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if settings.optimizer == "muon":
        hidden = lambda n, p: p.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n  # noqa: E731
        matrices = [(n, p) for n, p in named if hidden(n, p)]
        others = [(n, p) for n, p in named if not hidden(n, p)]
        lr_groups(named, settings)  # every glob must match something, in one part or the other
        # a glob's rate is a Muon rate for the matrices it matches and an AdamW rate for the rest
        return MuonAdamW(lr_groups(matrices, settings, settings.muon_lr, check_unused=False),
                         lr_groups(others, settings, check_unused=False),
                         betas=tuple(settings.betas), weight_decay=settings.weight_decay)
    return torch.optim.AdamW(lr_groups(named, settings), lr=settings.lr, betas=tuple(settings.betas),
                             weight_decay=settings.weight_decay)


def make_scheduler(optimizer, settings, steps: int):
    warm = settings.warmup_steps or (round(settings.warmup_ratio * steps) if settings.warmup_ratio else 0)

    def factor(step):
        if warm and step < warm:
            return (step + 1) / warm
        if settings.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        if settings.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_stage(*, accelerator, objective, blocks, settings, stage_name, stage_index, seed,
                run: RunState, resume: bool, metrics_path: Path, progress: bool = True, distributed=None) -> StageResult:
    """Train ``objective`` on ``blocks`` (``[N, seq_len]`` token ids: a tensor or a ``PackedBlocks``) with the
    stage's settings. ``distributed``: the recipe's ``DistributedSpec`` (None: DDP when there are processes)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if settings.batch_size % world:
        raise RnnifyError(f"stage {stage_name}: batch_size {settings.batch_size} is not divisible by the "
                          f"{world} processes; set batch_size to a multiple of {world}")
    steps = total_steps(settings, world)
    device = accelerator.device
    fsdp = fsdp_requested(distributed.strategy if distributed is not None else "auto")
    if fsdp and world == 1:
        accelerator.print(f"[{stage_name}] fsdp with one process: nothing to shard, training unsharded")
        fsdp = False
    sharded = None
    if fsdp:
        if settings.optimizer == "muon":
            raise RnnifyError(f"stage {stage_name}: optimizer muon orthogonalises whole weight matrices, which FSDP "
                              "splits across processes; use optimizer adamw under fsdp, or distributed.strategy ddp")
        sharded = ShardedStage(objective, device=device, bf16=settings.dtype == "bfloat16", world=world,
                               reshard_after_forward=distributed.reshard_after_forward if distributed else True,
                               shard_teacher=distributed.shard_teacher if distributed else True)
        model = sharded.objective
        student = model.student
        accelerator.print(f"[{stage_name}] FSDP2 over {world} processes: {sharded.describe()}")
    else:
        student = objective.student
    params = [p for n, p in student.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(student, settings)
    scheduler = make_scheduler(optimizer, settings, steps)
    if not fsdp:
        model, optimizer = accelerator.prepare(objective, optimizer)
    stage_seed = seed + 7919 * (stage_index + 1)

    start = 0
    point = run.resume_point(stage_name, log=accelerator.print) if resume else None
    if point is not None:
        ckpt, meta, weights, optim = point
        named = {n: p for n, p in student.named_parameters() if p.requires_grad}
        if set(weights) != set(named):
            odd = sorted(set(weights) ^ set(named))[:3]
            raise RnnifyError(f"checkpoint {ckpt} holds other trainable parameters than this stage trains ({odd} ...): "
                              "it was written by a different recipe; start afresh with --fresh")
        if ("optimizer_fqn" in optim) != fsdp:
            raise RnnifyError(f"checkpoint {ckpt} was written {'with' if 'optimizer_fqn' in optim else 'without'} "
                              f"FSDP and this run is {'sharded' if fsdp else 'not sharded'}: resume it with the "
                              "distributed.strategy that wrote it, or restart the stage with --fresh")
        if fsdp:
            sharded.load_trainable(weights)
            sharded.load_optimizer_state(optimizer, optim["optimizer_fqn"])
        else:
            with torch.no_grad():
                for k, v in weights.items():
                    named[k].copy_(v)
            optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
        torch.set_rng_state(optim["rng"])
        start = meta["step"]
        accelerator.print(f"[{stage_name}] resumed from {ckpt} (step {start}/{steps})")

    def save(step):
        if fsdp:  # collectives: every process gathers, the main one writes full tensors
            trainable = sharded.full_trainable()
            optim_state = {"optimizer_fqn": sharded.optimizer_state(optimizer)}
        else:
            trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
            optim_state = {"optimizer": optimizer.state_dict()} if accelerator.is_main_process else {}
        if accelerator.is_main_process:
            run.save_checkpoint(stage_name, step, trainable, optim_state, scheduler,
                                {"stage": stage_name, "world_size": world,
                                 "sharding": "fsdp" if fsdp else "none"}, settings.keep_checkpoints)
        accelerator.wait_for_everyone()
        return run.checkpoints(stage_name)[-1] if accelerator.is_main_process else None

    # bfloat16: autocast (under FSDP also its mixed-precision policy: bf16 gathered parameters, fp32 gradient
    # reduction; autocast then covers the teacher's parts that stay whole)
    dtype_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if settings.dtype == "bfloat16" \
        else contextlib.nullcontext
    tokens_per_step = settings.batch_size * settings.grad_accum * settings.seq_len
    bar = None
    if progress and accelerator.is_main_process:
        bar = tqdm(total=steps, initial=start, desc=stage_name, unit="step", dynamic_ncols=True)
    model.train()
    t0, done_tokens, loss_value = time.time(), 0, float("nan")
    step = start
    recompute = activation_checkpointing(student, settings.gradient_checkpointing)
    recompute.__enter__()
    try:
        for step in range(start, steps):
            if _BEFORE_STEP is not None:
                _BEFORE_STEP(stage_name, step)
            if os.environ.get(_STOP_ENV) == str(step) and step > start:
                raise KeyboardInterrupt
            total, metrics_sum = 0.0, {}
            objective.set_step(stage_seed, step)  # per-step choices (e.g. a sampled window) are the same on every rank
            for micro in range(settings.grad_accum):
                idx = _stage_batch_indices(blocks, stage_seed, step, micro, settings)
                local = idx[rank::world]
                batch = blocks[local].to(device=device, dtype=torch.long)
                sync = micro == settings.grad_accum - 1
                if fsdp:
                    sharded.set_gradient_sync(sync)
                    ctx = contextlib.nullcontext()
                else:
                    ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
                with ctx, dtype_ctx():
                    loss, metrics = model(batch)
                accelerator.backward(loss / settings.grad_accum)
                total += loss.detach().float() / settings.grad_accum
                for k, v in metrics.items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + v / settings.grad_accum
            mean_loss = accelerator.reduce(total.to(device), reduction="mean").item()
            # every process reports the tokens it trained on this step (shows all of them take part)
            rank_tokens = accelerator.gather(torch.tensor([len(local) * settings.seq_len * settings.grad_accum],
                                                          device=device)).tolist()
            if not math.isfinite(mean_loss):
                last = run.checkpoints(stage_name)
                raise RnnifyError(
                    f"stage {stage_name}: loss is {mean_loss} at step {step + 1}; lower lr (now "
                    f"{scheduler.get_last_lr()[0]:.3g}) or use float32. "
                    + (f"Last good checkpoint: {last[-1]}" if last else "No checkpoint was written yet.")
                )
            if settings.grad_clip:
                if fsdp:  # over DTensor gradients: the norm is reduced across the shards
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                else:
                    accelerator.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = mean_loss
            done_tokens += tokens_per_step
            elapsed = time.time() - t0
            if accelerator.is_main_process and ((step + 1) % settings.log_every == 0 or step + 1 == steps):
                record = {"stage": stage_name, "step": step + 1, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                          "tokens": (step + 1) * tokens_per_step, "tokens_per_s": done_tokens / max(elapsed, 1e-9),
                          "world_size": world, "rank_tokens": rank_tokens, **metrics_sum}
                if "recurrence" in objective.student_kwargs:
                    record["loops"] = objective.student_kwargs["recurrence"]
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4g}", tok_s=f"{done_tokens / max(elapsed, 1e-9):.0f}")
                bar.update(1)
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < steps:
                save(step + 1)
        step = steps
    except KeyboardInterrupt:
        # parameters are as after the last finished step: keep them so --resume continues from here
        if step > start:
            path = save(step)
            accelerator.print(f"\n[{stage_name}] interrupted; checkpoint at step {step}: {path}")
        raise
    finally:
        recompute.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    if fsdp:
        sharded.gather_back()
    return StageResult(steps, steps * tokens_per_step, loss_value, time.time() - t0,
                       teacher_sharded=bool(sharded and sharded.teacher_sharded))
