"""The student of a recipe: its conversion and transforms, the hybrid chosen after a stage trained every layer
(``conversion.select_after``), and what each stage wraps and trains (LoRA through peft)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .. import sources
from ..convert import convert, transform
from ..convert.auto_spec import parse_auto
from ..convert.layer_select import select_trained
from ..distill.stages import active_layers, select_trainable
from ..errors import RnnifyError
from ..recipe import Recipe, load_recipe, shipped_recipes


def recipe_student(recipe: Recipe, teacher, tokenizer=None, log=None, selected: list[int] | None = None):
    """The recipe's conversion of ``teacher``, then its transforms in order. With ``conversion.select_after`` every
    layer is converted until that stage has chosen the kept layers; ``selected`` is its choice once made."""
    c = recipe.conversion
    if c.start_from is not None:
        student = converted_start(recipe, teacher, log)
    else:
        keep = c.keep_attention if c.select_after is None else (selected or [])
        student = convert(teacher, c.method, keep_attention=keep, options=c.options,
                          attention_fraction=c.attention_fraction, attention_every=c.attention_every,
                          tokenizer=tokenizer, select_text=c.select_text, select_mode=c.select_mode,
                          select_tokens=c.select_tokens, log=log)
    for t in c.transforms:
        student = transform(student, t.method, t.options)
    return student


def start_config(recipe: Recipe, source_config):
    """The config of ``conversion.start_from``, checked to be an rnnify model that ``conversion.method`` converted
    from a model shaped as ``source_config`` (the teacher's), so a post-training starts from what the recipe says."""
    c = recipe.conversion
    try:
        config = sources.load_config(c.start_from, progress=lambda *_: None)
    except RnnifyError as e:
        writer = [name for name, _ in shipped_recipes()
                  if load_recipe(name).output.dir.rstrip("/") == c.start_from.rstrip("/")]
        hint = f"; it is what `rnnify run {writer[0]}` writes: run that first" if writer else ""
        raise RnnifyError(f"conversion.start_from: {e}{hint}") from None
    if getattr(config, "model_type", None) != "rnnify":
        raise RnnifyError(f"conversion.start_from: {c.start_from} is not an rnnify model (model_type "
                          f"{getattr(config, 'model_type', None)!r}); give a folder that `rnnify run` or "
                          "`rnnify convert` wrote")
    if config.method != c.method:
        raise RnnifyError(f"conversion.start_from: {c.start_from} was converted with {config.method!r}, and "
                          f"conversion.method says {c.method!r}; they must agree")
    base, source = config.base_config, source_config.get_text_config(decoder=True)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(base, key, None) != getattr(source, key, None):
            raise RnnifyError(f"conversion.start_from: {c.start_from} was not converted from model.source "
                              f"{recipe.model.source}: its {key} is {getattr(base, key, None)}, the source's "
                              f"{getattr(source, key, None)}")
    return config


def check_start(recipe: Recipe) -> None:
    """``conversion.start_from`` checked from the configs alone, before any weights load."""
    start_config(recipe, sources.load_config(recipe.model.source, progress=lambda *_: None))


def converted_start(recipe: Recipe, teacher, log=None):
    """``conversion.start_from``: the model ``recipe.conversion.method`` already converted from the teacher, loaded
    (on the meta device when the teacher is there, for the memory plan)."""
    c = recipe.conversion
    config = start_config(recipe, teacher.config)
    dtype = next(teacher.parameters()).dtype
    if next(teacher.parameters()).is_meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    student = sources.load_source(c.start_from, dtype=dtype, progress=log or (lambda *_: None))[0]
    if log:
        log(f"start from {c.start_from} ({c.method}, {len(student.new_parameter_names())} tensors its conversion "
            "added)")
    return student


def select_after_training(recipe: Recipe, teacher, tok, trained, log):
    """``conversion.select_after``: score the layers of the trained all-converted model, and return (the hybrid that
    keeps the chosen layers as the teacher's attention and every other trained weight, its kept layers, scores)."""
    c = recipe.conversion
    spec = parse_auto(c.keep_attention)
    keep, scores = select_trained(teacher, trained, spec, tok, c.select_text, c.select_mode, c.select_tokens, log=log)
    log(f"keep-attention {spec} after stage {c.select_after}: layers {keep or 'none'} chosen by {c.select_mode} "
        "scores of the trained model: " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(scores)))
    hybrid = recipe_student(recipe, teacher, selected=keep)
    target = hybrid.state_dict()
    restored = tuple(f"model.layers.{i}.self_attn." for i in keep)
    for name, value in trained.state_dict().items():
        if name in target:
            target[name].copy_(value)
        elif not name.startswith(restored):
            raise RnnifyError(f"select_after: the trained weight {name} has no place in the hybrid")
    hybrid.train(trained.training)
    return hybrid, keep, scores


def apply_lora(student, lora):
    from peft import LoraConfig, get_peft_model  # optional at import time: only lora: stages need peft

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules))
    return get_peft_model(student, cfg)


def stage_model(student, settings, spec, new_names):
    """What a stage trains: (the model it wraps: the student or a LoRA wrapper of it, the trainable parameter names,
    the converted layers active in it or None for all)."""
    model = student
    active = active_layers(student, settings)  # converted layers this stage trains (None: all)
    lora = getattr(settings, "lora", None)
    if lora is not None:
        model = apply_lora(student, lora)  # the adapters train; `trainable` adds more
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if settings.trainable:
            trainable = select_trainable(model, settings.trainable, new_names, keep_existing=True)
    else:
        stage_new = new_names if active is None else [n for n in new_names if int(n.split(".")[2]) in active]
        trainable = select_trainable(model, settings.trainable or list(spec.trainable), stage_new)
    return model, trainable, active


__all__ = ["apply_lora", "check_start", "converted_start", "recipe_student", "select_after_training", "stage_model"]
