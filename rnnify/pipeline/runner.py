"""``rnnify run``: convert, train the recipe's stages in order, evaluate, save."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from .. import sources
from ..card import model_card
from ..distill.checkpoint import RunState
from ..distill.data import check_data_files
from ..distill.mixture import MixedBlocks
from ..distill.offset_blocks import OffsetBlocks
from ..distill.stages import build_objective
from ..distill.token_cache import PackedBlocks
from ..distill.trainer import train_stage
from ..errors import RnnifyError
from ..eval.report import evaluate, write_eval
from ..hub import push, resolve_token
from ..io import check_output_dir, write_model_folder
from ..recipe import Recipe, dump_recipe
from .data_read import blocks_to_skip, continues, tokens_read
from .memory_plan import fmt, plan_recipe
from .plan import PlannedStage, RunPlan
from .student import check_start, recipe_student, select_after_training, stage_model


def _log(accelerator, msg):
    if accelerator is None or accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)


def make_accelerator():
    # accelerate only sets up a multi-process CPU group (gloo) when told it runs on CPU
    cpu = not torch.cuda.is_available()
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def device_memory(device, processes: int) -> int:
    """Bytes one process may use: its GPU's memory, or on CPU the machine's RAM shared by the processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // processes


def check_device_memory(recipe: Recipe, processes: int, device, log) -> None:
    """Warn, before any weights load, when the memory plan of a stage exceeds what a process has."""
    limit = device_memory(device, processes)
    try:
        plan = plan_recipe(recipe, devices=processes, device_memory=limit, cuda=device.type == "cuda")
    except Exception as e:  # noqa: BLE001 - the plan is advice: a model it cannot trace still trains
        log(f"note: no memory plan for this run ({type(e).__name__}: {e})")
        return
    if not plan.fits():
        worst = max(plan.stages, key=lambda s: s.total)
        log(f"warning: by its memory plan this run needs {fmt(worst.total)} per process in stage {worst.stage}, "
            f"and a process here has {fmt(limit)}; it may run out of memory:\n{plan.report()}")


def run_recipe(recipe: Recipe, *, only_stage: str | None = None, resume: bool = False, fresh: bool = False,
               progress: bool = True, accelerator=None) -> dict:
    """Run a recipe; returns a summary dict (stages run, eval results, output folder)."""
    plan = RunPlan.of(recipe, only_stage=only_stage, resume=resume, fresh=fresh)
    accelerator = accelerator or make_accelerator()
    log = lambda m: _log(accelerator, m)  # noqa: E731
    torch.manual_seed(recipe.seed)
    run = RunState(plan.run_dir)
    prepare_run_folder(plan, run, accelerator, log)
    t_start = time.time()
    if accelerator.is_main_process:
        check_device_memory(recipe, accelerator.num_processes, accelerator.device, log=log)
    teacher, tok = load_teacher(plan, log)

    completed = run.completed() if not plan.starts_afresh else []
    prior = plan.prior(completed)
    select_after = recipe.conversion.select_after
    # the weights saved by the select_after stage (and later ones) are those of the hybrid it chose
    selected = run.load()["stages"][select_after]["selected_layers"] if select_after in prior else None
    student = recipe_student(recipe, teacher, tok, log=log, selected=selected)
    if selected is not None:
        log(f"layers {selected} kept as attention, as chosen after stage {select_after}")
    if not plan.needs_teacher:
        # self-distillation uses the student's own source view: hold the weights once while training; the
        # evaluation loads the source again
        del teacher
        gc.collect()
        teacher = None
    new_names = student.new_parameter_names()
    if recipe.conversion.start_from is None:
        log(f"converted {recipe.model.source} with {recipe.conversion.method}: {len(new_names)} new parameter tensors")
    if plan.only_stage and len(prior) < plan.names.index(plan.only_stage):
        missing = [n for n in plan.names[:plan.names.index(plan.only_stage)] if n not in completed]
        log(f"warning: earlier stage(s) {missing} have not run; {plan.only_stage} starts from their absence")
    if prior:
        run.load_stage_weights(prior[-1], student)
        log(f"resumed after stage {prior[-1]} ({run.stage_weights(prior[-1])})")

    summary = {"stages": {}, "output": str(plan.out)}
    teacher_sharded = False
    to_run = {s.name for s in plan.to_run(completed)}
    # how far the start model's training read each source: a continuing stage reads on from there
    read = tokens_read(recipe.conversion.start_from, log) if any(
        continues(recipe, s) for s in plan.stages if s.name in to_run) else {}
    for stage in plan.stages:
        if stage.name not in to_run:
            if plan.only_stage is None:
                log(f"stage {stage.name}: already finished, skipped")
            continue
        student, info, sharded = train_one_stage(plan, stage, student, new_names, teacher, tok, run, accelerator,
                                                 progress, log, read)
        teacher_sharded = teacher_sharded or sharded
        if stage.name == select_after:  # saved with the stage's completion, so a resumed run rebuilds this hybrid
            if teacher_sharded:
                raise RnnifyError("conversion.select_after scores layers against the whole teacher; it cannot run "
                                  "with a sharded teacher (set distributed.shard_teacher: false)")
            student, keep, scores = select_after_training(recipe, teacher, tok, student, log=log)
            student.requires_grad_(False)
            new_names = student.new_parameter_names()
            info.update(selected_layers=keep, layer_scores=scores)
        if accelerator.is_main_process:
            run.mark_completed(stage.name, student, info)
        accelerator.wait_for_everyone()
        summary["stages"][stage.name] = info
        log(f"stage {stage.name}: done in {info['seconds']:.0f}s, final loss {info['final_loss']:.4g}")

    summary["finished"] = all(n in run.completed() for n in plan.names)
    if summary["finished"]:
        finish(plan, student, teacher if not teacher_sharded else None, tok, run, accelerator, summary, log)
        log(f"saved {plan.out} ({time.time() - t_start:.0f}s in all)")
    accelerator.wait_for_everyone()
    return summary


def prepare_run_folder(plan: RunPlan, run: RunState, accelerator, log) -> None:
    """Check the output and run folders (a rerun never destroys an interrupted run's checkpoints), the data files and
    the Hub token, before anything loads; then record the recipe in the run folder."""
    recipe = plan.recipe
    if plan.starts_afresh:
        check_output_dir(plan.out, recipe.output.overwrite)
        earlier = run.dir.exists() and run.has_state()
        if earlier and not plan.fresh:
            raise RnnifyError(
                f"run folder {run.dir} holds an earlier run of this recipe ({run.describe()}); continue it with "
                "--resume, or start afresh with --fresh (the earlier run folder is kept under a new name)")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and run.dir.exists():
            if earlier:
                log(f"--fresh: the earlier run folder is kept as {run.move_aside()}")
            else:
                shutil.rmtree(run.dir)  # only the recipe.yaml of a run that stopped before it trained
        accelerator.wait_for_everyone()
    check_data_files(recipe.datasets)
    if recipe.conversion.start_from is not None:  # before the source loads: a missing start is named as such
        check_start(recipe)
    if recipe.hub.push:  # fail before hours of training, not after
        resolve_token()
    if accelerator.is_main_process:
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "recipe.yaml").write_text(dump_recipe(recipe))


def load_teacher(plan: RunPlan, log):
    """The source model and its tokenizer; warns when a stage trains past the source's positions."""
    teacher, tok = sources.load_source(plan.recipe.model.source, dtype=plan.recipe.model.dtype, progress=log)
    if tok is None:
        raise RnnifyError(f"{plan.recipe.model.source}: no tokenizer found; training needs one to tokenise data")
    max_pos = getattr(teacher.config.get_text_config(decoder=True), "max_position_embeddings", None)
    for stage in plan.stages:
        seq_len = stage.settings.seq_len
        if max_pos and seq_len > max_pos:
            log(f"warning: stage {stage.name} trains on seq_len {seq_len}, beyond the source's "
                f"max_position_embeddings {max_pos}: RoPE positions it never saw; expect worse quality "
                "unless the recipe extends the context on purpose")
    return teacher, tok


def stage_parts(plan: RunPlan, stage: PlannedStage, tok, read: dict[str, int], log) -> list:
    """The packed blocks of each of the stage's sources (packed once into the on-disk token cache, reused by later
    runs; a streaming source is packed as training reaches its blocks), each read from where the start model's
    training stopped in it when the stage continues (``read``: ``data_read.tokens_read``)."""
    parts = []
    for key, (spec, _) in stage.data.items():
        part = PackedBlocks(spec, tok, stage.settings.seq_len, log=log)
        skip, tokens = blocks_to_skip(read, spec, stage.settings.seq_len) if continues(plan.recipe, stage) else (0, 0)
        if skip:
            part = OffsetBlocks(part, skip).ensure(1)
            source, n = plan.recipe.conversion.start_from, len(part.part)
            seen = (f"read all {n:,} of its blocks ({tokens / (n * part.seq_len):.1f} passes)" if part.start != skip
                    else f"read its first {tokens:,} tokens")
            log(f"stage {stage.name}: data {key} read from block {part.start:,} on ({source}'s training {seen}; "
                "`data_start: beginning` reads from the first block)")
        parts.append(part)
    return parts


def train_one_stage(plan: RunPlan, stage: PlannedStage, student, new_names, teacher, tok, run: RunState, accelerator,
                    progress, log, read: dict[str, int] | None = None):
    """Train one stage of the plan: returns (the student after it, its record, whether the teacher was sharded)."""
    settings = stage.settings
    parts = stage_parts(plan, stage, tok, read or {}, log)
    blocks = parts[0] if len(parts) == 1 else \
        MixedBlocks(parts, [w for _, w in stage.data.values()], list(stage.data), log=log)
    if blocks.lazy:
        blocks.ensure(settings.batch_size)  # bad data fails here, not at step 1
    else:
        blocks.ensure(stage.blocks).limit(stage.blocks)
    model, trainable, active = stage_model(student, settings, stage.spec, new_names)
    n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    log(f"stage {stage.name} ({stage.type}): {stage.steps} steps x {settings.batch_size * settings.grad_accum} "
        f"x {settings.seq_len} tokens from {stage.data_key} "
        f"({'streamed' if blocks.lazy else f'{len(blocks):,} blocks'}); "
        f"training {n_train:,} parameters in {len(trainable)} tensors; {accelerator.num_processes} process(es)")
    if active is not None:
        log(f"stage {stage.name}: active converted layers {active} (the others run the teacher's attention)")
    objective = build_objective(stage.type, model, teacher if stage.spec.needs_teacher else None, settings, active,
                                total_steps=stage.steps)
    result = train_stage(
        accelerator=accelerator, objective=objective, blocks=blocks,
        settings=settings, stage_name=stage.name, stage_index=stage.index, seed=plan.recipe.seed, run=run,
        resume=not plan.starts_afresh, metrics_path=run.dir / "metrics.jsonl", progress=progress,
        distributed=plan.recipe.distributed,
    )
    if model is not student:  # LoRA: fold the adapters into the weights
        student = model.merge_and_unload() if settings.lora.merge else model
    student.requires_grad_(False)
    info = {"steps": result.steps, "tokens": result.tokens, "final_loss": result.final_loss,
            "seconds": round(result.seconds, 1), "world_size": accelerator.num_processes}
    starts = {key: part.start for key, part in zip(stage.data, parts) if isinstance(part, OffsetBlocks)}
    if starts:  # the block each source was read from (past what the start model read)
        info["data_from_block"] = starts
    return student, info, result.teacher_sharded


def finish(plan: RunPlan, student, teacher, tok, run: RunState, accelerator, summary: dict, log) -> None:
    """Evaluate (on the main process), save the output folder, push it when the recipe asks."""
    recipe = plan.recipe
    student.eval()
    if not accelerator.is_main_process:
        return
    eval_results = None
    if recipe.eval is not None:
        if teacher is None and recipe.eval.teacher:  # dropped for training, or FSDP shards
            teacher = sources.load_source(recipe.model.source, dtype=recipe.model.dtype, progress=log)[0]
        eval_results = evaluate(student, tok, recipe.eval, teacher=teacher, log=log)
        summary["eval"] = eval_results
    tokens_trained = sum(v.get("tokens", 0) for v in run.load().get("stages", {}).values())
    summary["tokens_trained"] = tokens_trained
    save_output(student, tok, recipe, plan.out, eval_results, run, tokens_trained)
    if recipe.hub.push:
        summary["hub_url"] = push(plan.out, recipe.hub.repo_id, private=recipe.hub.private, revision=recipe.hub.revision)
        log(f"pushed {plan.out} to {summary['hub_url']}")


def save_output(student, tok, recipe: Recipe, out: Path, eval_results, run: RunState, tokens_trained: int):
    files = {"recipe.yaml": dump_recipe(recipe)}
    if (run.dir / "metrics.jsonl").exists():
        files["metrics.jsonl"] = (run.dir / "metrics.jsonl").read_text()
    card = model_card(student, source=recipe.model.source, recipe=recipe.model_dump(mode="json"),
                      eval_results=eval_results, training=run.load().get("stages", {}), repo_id=recipe.hub.repo_id,
                      name=recipe.name)
    # eval.json, the plots, and their links in the card's Evaluation section
    finish = None if eval_results is None else (lambda tmp: write_eval(tmp, eval_results))
    write_model_folder(out, student, tok, card=card, files=files, max_shard_size=recipe.output.max_shard_size,
                       overwrite=True, finish=finish)
