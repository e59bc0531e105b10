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
from ..distill.stages import STAGES, build_objective
from ..distill.token_cache import PackedBlocks
from ..distill.trainer import total_steps, train_stage
from ..errors import RnnifyError
from ..eval.report import evaluate, write_eval
from ..hub import push, resolve_token
from ..io import check_output_dir, write_model_folder
from ..recipe import Recipe, dump_recipe
from .memory_plan import fmt, plan_recipe
from .student import recipe_student, select_after_training, stage_model


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


def check_memory(recipe: Recipe, processes: int, device, log) -> None:
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
    accelerator = accelerator or make_accelerator()
    torch.manual_seed(recipe.seed)
    run = RunState(recipe.run_dir())
    out = Path(recipe.output.dir)
    names = [s.name for s in recipe.stages]
    if only_stage is not None and only_stage not in names:
        raise RnnifyError(f"--stage {only_stage!r} is not in this recipe; its stages: {', '.join(names)}")
    if fresh and (resume or only_stage is not None):
        raise RnnifyError("--fresh starts the recipe from the beginning; it cannot go with --resume or --stage")
    if not resume and only_stage is None:
        check_output_dir(out, recipe.output.overwrite)
        earlier = run.dir.exists() and run.has_state()
        if earlier and not fresh:  # an interrupted run's checkpoints are never destroyed by a rerun
            raise RnnifyError(
                f"run folder {run.dir} holds an earlier run of this recipe ({run.describe()}); continue it with "
                "--resume, or start afresh with --fresh (the earlier run folder is kept under a new name)")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and run.dir.exists():
            if earlier:
                _log(accelerator, f"--fresh: the earlier run folder is kept as {run.move_aside()}")
            else:
                shutil.rmtree(run.dir)  # only the recipe.yaml of a run that stopped before it trained
        accelerator.wait_for_everyone()
    check_data_files(recipe.datasets)
    if recipe.hub.push:  # fail before hours of training, not after
        resolve_token()
    if accelerator.is_main_process:
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "recipe.yaml").write_text(dump_recipe(recipe))
    metrics_path = run.dir / "metrics.jsonl"

    t_start = time.time()
    if accelerator.is_main_process:
        check_memory(recipe, accelerator.num_processes, accelerator.device, log=lambda m: _log(accelerator, m))
    teacher, tok = sources.load_source(recipe.model.source, dtype=recipe.model.dtype,
                                      progress=lambda m: _log(accelerator, m))
    if tok is None:
        raise RnnifyError(f"{recipe.model.source}: no tokenizer found; training needs one to tokenise data")
    max_pos = getattr(teacher.config.get_text_config(decoder=True), "max_position_embeddings", None)
    for i, stage in enumerate(recipe.stages):
        seq_len = recipe.stage_settings(i).seq_len
        if max_pos and seq_len > max_pos:
            _log(accelerator, f"warning: stage {stage.name} trains on seq_len {seq_len}, beyond the source's "
                              f"max_position_embeddings {max_pos}: RoPE positions it never saw; expect worse quality "
                              "unless the recipe extends the context on purpose")
    completed = run.completed() if (resume or only_stage) else []
    # start from the weights of the last finished stage before the first stage we will run
    first_to_run = names.index(only_stage) if only_stage else \
        next((i for i, n in enumerate(names) if n not in completed), len(names))
    prior = [n for n in names[:first_to_run] if n in completed]
    select_after = recipe.conversion.select_after
    # the weights saved by the select_after stage (and later ones) are those of the hybrid it chose
    selected = run.load()["stages"][select_after]["selected_layers"] if select_after in prior else None
    student = recipe_student(recipe, teacher, tok, log=lambda m: _log(accelerator, m), selected=selected)
    if selected is not None:
        _log(accelerator, f"layers {selected} kept as attention, as chosen after stage {select_after}")
    if not select_after and not any(STAGES[s.type].needs_teacher for s in recipe.stages):
        # no stage needs a separate teacher (self-distillation uses the student's own source view): hold the weights
        # once while training; the evaluation loads the source again
        del teacher
        gc.collect()
        teacher = None
    new_names = student.new_parameter_names()
    _log(accelerator, f"converted {recipe.model.source} with {recipe.conversion.method}: "
                      f"{len(new_names)} new parameter tensors")

    if only_stage and len(prior) < first_to_run:
        missing = [n for n in names[:first_to_run] if n not in completed]
        _log(accelerator, f"warning: earlier stage(s) {missing} have not run; {only_stage} starts from their absence")
    if prior:
        run.load_stage_weights(prior[-1], student)
        _log(accelerator, f"resumed after stage {prior[-1]} ({run.stage_weights(prior[-1])})")

    summary = {"stages": {}, "output": str(out)}
    teacher_sharded = False
    for i, stage in enumerate(recipe.stages):
        if only_stage is not None and stage.name != only_stage:
            continue
        if only_stage is None and stage.name in completed:
            _log(accelerator, f"stage {stage.name}: already finished, skipped")
            continue
        settings = recipe.stage_settings(i)
        spec = STAGES[stage.type]
        lora = getattr(settings, "lora", None)
        data_key = settings.data or next(iter(recipe.datasets))
        steps = total_steps(settings)
        n_blocks = steps * settings.batch_size * settings.grad_accum
        # packed once into the on-disk token cache (reused by later runs); a streaming source is packed as training
        # reaches its blocks
        blocks = PackedBlocks(recipe.datasets[data_key], tok, settings.seq_len, log=lambda m: _log(accelerator, m))
        if blocks.lazy:
            blocks.ensure(settings.batch_size)  # bad data fails here, not at step 1
        else:
            blocks.ensure(n_blocks).limit(n_blocks)
        model, trainable, active = stage_model(student, settings, spec, new_names)
        n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
        _log(accelerator, f"stage {stage.name} ({stage.type}): {steps} steps x {settings.batch_size * settings.grad_accum} "
                          f"x {settings.seq_len} tokens from {data_key} "
                          f"({'streamed' if blocks.lazy else f'{len(blocks):,} blocks'}); "
                          f"training {n_train:,} parameters in {len(trainable)} tensors; {accelerator.num_processes} process(es)")
        if active is not None:
            _log(accelerator, f"stage {stage.name}: active converted layers {active} (the others run the teacher's attention)")
        objective = build_objective(stage.type, model, teacher if spec.needs_teacher else None, settings, active,
                                    total_steps=steps)
        result = train_stage(
            accelerator=accelerator, objective=objective, blocks=blocks,
            settings=settings, stage_name=stage.name, stage_index=i, seed=recipe.seed, run=run,
            resume=resume or only_stage is not None, metrics_path=metrics_path, progress=progress,
            distributed=recipe.distributed,
        )
        if result.teacher_sharded:
            teacher_sharded = True
        if model is not student:  # LoRA: fold the adapters into the weights
            student = model.merge_and_unload() if lora.merge else model
        student.requires_grad_(False)
        info = {"steps": result.steps, "tokens": result.tokens, "final_loss": result.final_loss,
                "seconds": round(result.seconds, 1), "world_size": accelerator.num_processes}
        if stage.name == select_after:  # saved with the stage's completion, so a resumed run rebuilds this hybrid
            if teacher_sharded:
                raise RnnifyError("conversion.select_after scores layers against the whole teacher; it cannot run "
                                  "with a sharded teacher (set distributed.shard_teacher: false)")
            student, keep, scores = select_after_training(recipe, teacher, tok, student,
                                                          log=lambda m: _log(accelerator, m))
            student.requires_grad_(False)
            new_names = student.new_parameter_names()
            info.update(selected_layers=keep, layer_scores=scores)
        if accelerator.is_main_process:
            run.mark_completed(stage.name, student, info)
        accelerator.wait_for_everyone()
        summary["stages"][stage.name] = info
        _log(accelerator, f"stage {stage.name}: done in {result.seconds:.0f}s, final loss {result.final_loss:.4g}")

    all_done = all(n in run.completed() for n in names)
    if not all_done:
        summary["finished"] = False
        return summary
    summary["finished"] = True
    student.eval()
    eval_results = None
    if recipe.eval is not None and accelerator.is_main_process:
        if teacher_sharded:  # its layers are FSDP shards: the main process alone cannot run it
            teacher = None
        if teacher is None and recipe.eval.teacher:
            teacher = sources.load_source(recipe.model.source, dtype=recipe.model.dtype,
                                         progress=lambda m: _log(accelerator, m))[0]
        eval_results = evaluate(student, tok, recipe.eval, teacher=teacher, log=lambda m: _log(accelerator, m))
        summary["eval"] = eval_results
    if accelerator.is_main_process:
        tokens_trained = sum(v.get("tokens", 0) for v in run.load().get("stages", {}).values())
        summary["tokens_trained"] = tokens_trained
        save_output(student, tok, recipe, out, eval_results, run, tokens_trained)
        _log(accelerator, f"saved {out} ({time.time() - t_start:.0f}s in all)")
        if recipe.hub.push:
            summary["hub_url"] = push(out, recipe.hub.repo_id, private=recipe.hub.private, revision=recipe.hub.revision)
            _log(accelerator, f"pushed {out} to {summary['hub_url']}")
    accelerator.wait_for_everyone()
    return summary


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
