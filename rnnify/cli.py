"""The ``rnnify`` command: inspect, convert, select-layers, export, push, cache, ls, cp, validate, run, eval and
generate (one ``cmd_<name>`` function each; ``main`` builds the parser)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, TextStreamer

from . import __version__, sources
from .cache_dirs import clear, usage
from .cache_size import cache_bytes
from .card import model_card
from .convert import METHODS, SUPPORTED_MODEL_TYPES, convert, get_method, validate
from .convert.auto_spec import AutoSpec, parse_auto
from .convert.base import count_new_parameters
from .convert.flags import add_method_flags, options_from_args
from .convert.layer_select import (
    DEFAULT_TEXT,
    cached_scores,
    choose,
    plan_cache_bytes,
    resolve_auto,
    teacher_cache_bytes,
)
from .convert.method import Transform, describe_options
from .distill.data import check_data_files
from .distill.stages import STAGES
from .distill.trainer import total_steps
from .errors import RnnifyError
from .eval.flops import flops_per_token
from .eval.harness import check_tasks
from .eval.plots import bar_chart
from .eval.report import _jsonable, evaluate, results_table, write_eval
from .eval.spec import EvalSpec
from .export import to_bamba
from .hub import push
from .io import check_output_dir, write_json_atomic, write_model_folder
from .modeling import RnnifyConfig, RnnifyForCausalLM
from .modeling.layer_program import describe
from .paths import RECIPES_DIR, resolve_path
from .pipeline.memory_plan import plan_recipe
from .pipeline.runner import run_recipe
from .recipe import dump_recipe, find_recipe, load_recipe
from .sources import ALIASES, DEFAULT_MODEL
from .units import human_bytes, parse_bytes


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args) -> None:
    t0 = time.time()
    src = sources.local_path(args.model, progress=_log)
    config = sources.read_config(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    is_student = isinstance(config, RnnifyConfig)
    cfg = config.base_config if is_student else config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n_params = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    attn_classes: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        attn_classes.setdefault(type(attn).__name__ if attn is not None else "(dropped)", []).append(i)
    info = {
        "model": args.model,
        "source": src.kind,
        "path": src.path,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "base_model_type": cfg.model_type,
        "convertible": (not is_student) and cfg.model_type in SUPPORTED_MODEL_TYPES,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "attention_heads": heads,
        "kv_heads": kv,
        "head_dim": head_dim,
        "vocab_size": cfg.vocab_size,
        "parameters": n_params,
        "layer_types": list(config.layer_types) if getattr(config, "layer_types", None) else None,
        "attention_modules": {k: _ranges(v) for k, v in attn_classes.items()},
        "sliding_window": getattr(cfg, "sliding_window", None),
    }
    if is_student:
        info["method"] = config.method
        info["transforms"] = config.transforms
        info["program"] = config.program
        info["layer_mixers"] = _ranges_by_value(config.layer_mixers)

    if is_student and len(getattr(model, "blocks", [])):
        loops = sorted({1, 2, 4, 8, model.default_recurrence()})
        info["flops_per_token"] = {f"{r} loops": flops_per_token(model, 2048, recurrence=r) for r in loops}
    else:
        info["flops_per_token"] = {"": flops_per_token(model, 2048)}
    kv_bytes = 2  # bf16 serving
    info["cache_bytes_per_sequence_bf16"] = {
        f"{n // 1024}k": cache_bytes(model, n, kv_bytes=kv_bytes) for n in (4096, 32768)
    }
    if args.method:
        info["plan"] = _plan(config, args, options_from_args(args), kv_bytes)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.model}  ({src.kind}: {src.path})")
    print(f"  architecture     {info['architecture']}  (model_type {info['model_type']}"
          + (f", base {cfg.model_type})" if is_student else ")"))
    print(f"  parameters       {n_params:,}")
    print(f"  layers           {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    print(f"  attention heads  {heads} query, {kv} key/value, head_dim {head_dim}"
          + (f", sliding window {info['sliding_window']}" if info["sliding_window"] else ""))
    types = info["layer_types"] or ["full_attention"] * cfg.num_hidden_layers
    print(f"  layer types      {_ranges_by_value(types)}")
    print(f"  token mixers     {info['attention_modules']}")
    if is_student:
        applied = "".join(f" + {t['method']}" for t in config.transforms)
        print(f"  method           {config.method}{applied}; mixer settings {config.mixer_config}")
        print("  layer program")
        for line in describe(config.parsed_program(), config.layer_types):
            print(f"    {line}")
    for k, v in info["cache_bytes_per_sequence_bf16"].items():
        print(f"  cache @ {k:>3} tok  {human_bytes(v)} per sequence (bf16 K/V, fp32 states)")
    if "flops_per_token" in info:
        print("  FLOPs per token  " + "; ".join(f"{k + ': ' if k else ''}{v / 1e6:,.0f} M"
                                                for k, v in info["flops_per_token"].items())
              + " (forward, at a 2048-token context)")
    if not is_student:
        verdict = "yes" if info["convertible"] else f"no (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        print(f"  convertible      {verdict}")
    if "plan" in info:
        plan = info["plan"]
        print(f"  plan ({args.method}): attention layers {plan['attention_layers'] or 'none'}; "
              f"{plan['converted_layers']} layers -> {plan['mixer']}")
        for line in plan["program_lines"]:
            print(f"    {line}")
        for k, v in plan["cache_bytes_per_sequence_bf16"].items():
            print(f"    cache @ {k:>3} tok  {human_bytes(v)} per sequence after conversion")
    _log(f"inspected in {time.time() - t0:.1f}s")


def _plan(config, args, options, kv_bytes) -> dict:
    """Layer program and cache size of a conversion, built on the meta device (no weights)."""
    method = get_method(args.method)
    keep, opts = validate(config, args.method, args.keep_attention, options, args.attention_fraction,
                          args.attention_every)
    if isinstance(method, Transform):
        raise RnnifyError(f"inspect --method {args.method}: a transform's plan needs the model's weights; run "
                          f"`rnnify convert {args.model} --method {args.method} --out DIR`, then inspect DIR")

    auto = parse_auto(args.keep_attention)
    if auto is not None:  # the choice needs the weights: load them and score (cached per source, method, text)

        source, tok = sources.load_source(args.model, progress=_log)
        keep, _ = resolve_auto(source, args.method, auto, opts, tok, args.select_text or DEFAULT_TEXT,
                               args.select_mode, args.select_tokens, log=_log)
    plan = method.plan(config, keep, opts)
    base = config.get_text_config(decoder=True).to_dict()
    base.pop("quantization_config", None)
    cfg = RnnifyConfig(base_config=base, program=plan.program, mixer_config=plan.mixer_config, method=args.method)
    with torch.device("meta"):
        student = RnnifyForCausalLM(cfg)
    mixers = sorted({m for m in cfg.layer_mixers if m not in ("attention", "dropped")}) or ["none"]
    return {
        "attention_layers": [i for i, m in enumerate(cfg.layer_mixers) if m == "attention"],
        "program": cfg.program,
        "program_lines": describe(cfg.parsed_program(), cfg.layer_types),
        "layer_types": cfg.layer_types,
        "converted_layers": sum(m not in ("attention", "dropped") for m in cfg.layer_mixers),
        "mixer": ", ".join(mixers),
        "cache_bytes_per_sequence_bf16": {f"{n // 1024}k": cache_bytes(student, n, kv_bytes=kv_bytes) for n in (4096, 32768)},
    }


def _ranges(idx: list[int]) -> str:
    out, start = [], None
    for j, i in enumerate(idx):
        if start is None:
            start = i
        if j + 1 == len(idx) or idx[j + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def _ranges_by_value(values: list[str]) -> str:
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return "; ".join(f"{k}: {_ranges(v)}" for k, v in groups.items())


# ---------------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> None:
    method = get_method(args.method)
    options = options_from_args(args)
    dtype = sources.parse_dtype(args.dtype)
    parse_bytes(args.max_shard_size, "--max-shard-size", bare_bytes=True)
    out = check_output_dir(args.out, args.overwrite)
    t0 = time.time()
    # everything that can be checked from the config fails here, before the weights load
    keep, resolved = validate(sources.load_config(args.model, progress=_log), args.method, args.keep_attention,
                              options, args.attention_fraction, args.attention_every)
    source, tok = sources.load_source(args.model, dtype="float32", progress=_log)
    _log(f"loaded {args.model} in {time.time() - t0:.1f}s")
    t1 = time.time()
    student = convert(source, args.method, keep_attention=args.keep_attention, options=options,
                      attention_fraction=args.attention_fraction, attention_every=args.attention_every,
                      tokenizer=tok, select_text=args.select_text, select_mode=args.select_mode,
                      select_tokens=args.select_tokens, log=_log)
    if dtype is not None:
        student = student.to(dtype)
        student.config.dtype = dtype
    n_new = count_new_parameters(student) if not isinstance(method, Transform) else \
        sum(p.numel() for p in student.parameters()) - sum(p.numel() for p in source.parameters())
    record = {
        "source": args.model,
        "method": args.method,
        "options": resolved,
        "keep_attention": [i for i, m in enumerate(getattr(student.config, "layer_mixers", [])) if m == "attention"],
        "program": getattr(student.config, "program", None),
        "dtype": str(next(student.parameters()).dtype).replace("torch.", ""),
        "rnnify_version": __version__,
    }
    write_model_folder(out, student, tok, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                       files={"rnnify_conversion.json": json.dumps(record, indent=2) + "\n"},
                       card=model_card(student, source=args.model, recipe={"conversion": record}, name=Path(args.out).name))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{'transformed' if isinstance(method, Transform) else 'converted'} {args.model} with {args.method} -> {out}  "
          f"({time.time() - t1:.1f}s)")
    print(f"  layers kept as attention: {record['keep_attention'] or 'none'}; "
          f"{'parameters added' if isinstance(method, Transform) else 'new parameters'} {n_new:,}")
    print(f"  weights {size / 2**20:.1f} MiB ({record['dtype']})")
    before = "before" if isinstance(method, Transform) else "teacher KV"
    for n in (4096, 32768):
        s, t = cache_bytes(student, n), cache_bytes(source, n)
        ratio = f"{t / s:.1f}x less" if s <= t else f"{s / t:.2f}x more"
        print(f"  cache per sequence @ {n // 1024}k tokens: {human_bytes(s)} vs {before} {human_bytes(t)} ({ratio})")


def cmd_cache(args) -> None:
    if args.clear:
        for name, size, kept in clear(args.clear):
            print(f"cleared {name}: {human_bytes(size)} freed"
                  + (f" ({kept} other item(s) in that folder kept: rnnify did not make them)" if kept else ""))
        return
    for row in usage():
        other = f" (+{row['other']} not rnnify's)" if row["other"] else ""
        print(f"{row['area']:<13} {human_bytes(row['bytes']):>10}  {row['entries']:>4} entries  {row['path']}{other}")
        print(f"{'':<13} {row['holds']}")


def cmd_select_layers(args) -> None:
    if (args.budget_layers is None) == (args.budget_cache is None):
        raise RnnifyError("give one budget: --budget-layers N or --budget-cache P%@L (e.g. 10%@4096)")
    if args.budget_cache is not None and "%" not in args.budget_cache:
        raise RnnifyError(f"--budget-cache {args.budget_cache!r}: accepted: a share of the teacher's cache, P% or "
                          "P%@L (e.g. 10% or 10%@4096); for a number of layers use --budget-layers N")
    if args.budget_layers is not None and args.budget_layers < 0:
        raise RnnifyError(f"--budget-layers {args.budget_layers}: accepted: a number of layers >= 0")
    spec = AutoSpec(layers=args.budget_layers) if args.budget_layers is not None \
        else parse_auto(f"auto:{args.budget_cache}", label=f"--budget-cache {args.budget_cache!r}")
    _, opts = validate(sources.load_config(args.model, progress=_log), args.method, str(spec), options_from_args(args))
    teacher, tok = sources.load_source(args.model, progress=_log)
    if tok is None:
        raise RnnifyError(f"{args.model}: no tokenizer found; scoring layers needs one to read --text")
    scores, student = cached_scores(teacher, args.method, opts, tok, args.text, args.mode, args.tokens, args.seq_len,
                                    log=_log)
    lengths = sorted({4096, 32768, spec.cache_length})
    t_cache = {n: teacher_cache_bytes(teacher, n) for n in lengths}
    keep = choose(scores, spec, student, t_cache[spec.cache_length])
    meaning = "fall when the layer is restored to attention" if args.mode == "restore" \
        else "rise when the layer alone is converted"
    print(f"layer scores ({args.mode}: KL {meaning}; higher = keep)")
    top = max(max(scores), 1e-12)
    for i, v in enumerate(scores):
        print(f"  layer {i:>3} {v:>10.4f} {'#' * max(0, round(30 * v / top))}{'  <- kept' if i in keep else ''}")
    print(f"kept as attention ({spec}): {keep or 'none'}")
    cache = {n: plan_cache_bytes(student, keep, n) for n in lengths}
    for n in lengths:
        print(f"  cache @ {n // 1024}k tokens: {human_bytes(cache[n])} vs teacher {human_bytes(t_cache[n])} "
              f"({100 * cache[n] / t_cache[n]:.1f}%)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"source": args.model, "method": args.method, "options": opts, "mode": args.mode, "text": args.text,
              "tokens": args.tokens, "budget": str(spec), "scores": scores, "keep_attention": keep,
              "cache_bytes": {str(n): cache[n] for n in lengths}, "teacher_cache_bytes": {str(n): t_cache[n] for n in lengths}}
    write_json_atomic(out / "layer_scores.json", record, indent=2)

    bar_chart(out / "layer_scores.png", [str(i) for i in range(len(scores))], scores,
              highlight=keep, title=f"{args.model} {args.method}: layer scores ({args.mode})", xlabel="layer",
              ylabel="KL change")
    print(f"wrote {out / 'layer_scores.json'} and {out / 'layer_scores.png'}")
    print(f"use it: rnnify convert {args.model} --method {args.method} --keep-attention {spec}  "
          f"(or --keep-attention {','.join(map(str, keep)) or 'none'})")


def cmd_export(args) -> None:
    if args.to != "bamba":
        raise RnnifyError(f"--to {args.to!r}: accepted: bamba")
    out = check_output_dir(args.out, args.overwrite)
    student, tok = sources.load_source(args.model, dtype=None, progress=_log)
    if not isinstance(student, RnnifyForCausalLM):
        raise RnnifyError(f"{args.model} is not an rnnify model")
    bamba = to_bamba(student)
    write_model_folder(out, bamba, tok, overwrite=args.overwrite)
    print(f"exported {args.model} -> {out} (BambaForCausalLM, attention layers {bamba.config.attn_layer_indices})")


def cmd_push(args) -> None:
    url = push(args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message)
    print(f"pushed {args.folder} -> {url}")


# ---------------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> None:
    if not args.prompt.strip():
        raise RnnifyError("the prompt is empty; give some text to continue, e.g. \"The capital of France is\"")
    if args.max_new_tokens < 1:
        raise RnnifyError(f"--max-new-tokens {args.max_new_tokens}: accepted: an integer >= 1")
    if args.temperature < 0:
        raise RnnifyError(f"--temperature {args.temperature}: accepted: 0 (greedy) or a positive number")
    if args.recurrence is not None and args.recurrence < 1:
        raise RnnifyError(f"--recurrence {args.recurrence}: accepted: an integer >= 1 (loops of the recurrent block)")
    torch.manual_seed(args.seed)
    model, tok = sources.load_source(args.model, dtype=args.dtype)
    if tok is None:
        raise RnnifyError(f"{args.model} has no tokenizer files; save one next to the model")
    text = args.prompt
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise RnnifyError(f"--chat: the tokenizer of {args.model} has no chat template; accepted: a model whose "
                              "tokenizer_config.json or chat_template.jinja defines one, or the prompt without --chat")
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    extra = {}
    if args.recurrence is not None:
        if not len(getattr(model, "blocks", [])):
            raise RnnifyError(f"--recurrence: {args.model} has no recurrent block (convert with --method retrofit)")
        extra["recurrence"] = args.recurrence
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    t0 = time.time()
    with torch.no_grad():
        outp = model.generate(
            **enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None, top_p=None, top_k=None,
            streamer=streamer, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **extra,
        )
    n = outp.shape[1] - enc["input_ids"].shape[1]
    _log(f"{n} tokens in {time.time() - t0:.2f}s ({n / max(time.time() - t0, 1e-9):.1f} tokens/s)")


# ---------------------------------------------------------------------------------------------- recipes
def cmd_ls(args) -> None:
    print("recipes:")
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line[1:].strip() for line in p.read_text().splitlines() if line.startswith("#")), "")
        print(f"  {p.stem:<20} {first}")
    print("methods:")
    for name, m in sorted(METHODS.items()):
        kind = " (transform: rewrites an rnnify model)" if isinstance(m, Transform) else ""
        print(f"  {name:<20} {m.summary}{kind}")
        if m.paper:
            print(f"  {'':<20} {m.paper.title} {m.paper.url}")
        opts = ", ".join(f"{o}={d}" for o, _, d in describe_options(m))
        print(f"  {'':<20} options: {opts or 'none'}")
    print("stages:")
    for name, stage in STAGES.items():
        print(f"  {name:<20} {stage.summary}")


def cmd_cp(args) -> None:
    src = find_recipe(args.name)
    if src.parent != RECIPES_DIR:
        raise RnnifyError(f"{args.name!r} is not a shipped recipe; see `rnnify ls`")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.overwrite:
        raise RnnifyError(f"{dest} exists; pass --overwrite to replace it")
    if not dest.parent.is_dir():
        raise RnnifyError(f"cannot write {dest}: the folder {dest.parent} does not exist")
    dest.write_text(src.read_text())
    print(f"copied {src.stem} -> {dest}")


def cmd_validate(args) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    check_data_files(recipe.datasets)
    print(f"# {args.recipe}: valid. Resolved recipe:")
    print(dump_recipe(recipe), end="")
    print("# plan:")
    c = recipe.conversion
    kept = (f"attention fraction {c.attention_fraction}" if c.attention_fraction is not None else
            f"every {c.attention_every}th layer" if c.attention_every else c.keep_attention or "none")
    print(f"#   convert {recipe.model.source} with {c.method} (layers kept as attention: {kept})"
          + "".join(f", then {t.method} {t.options}" for t in c.transforms))
    for i, stage in enumerate(recipe.stages):
        st = recipe.stage_settings(i)
        steps = total_steps(st)
        print(f"#   stage {stage.name} ({stage.type}): {steps} steps, "
              f"{steps * st.batch_size * st.grad_accum * st.seq_len:,} tokens, lr {st.lr:g}, seq_len {st.seq_len}")
    print(f"#   then {'evaluate and ' if recipe.eval else ''}save to {recipe.output.dir} (run state in {recipe.run_dir()})")
    if args.plan or args.gpus is not None or args.gpu_memory or args.source or args.strategy:
        gpus, memory = args.gpus, parse_bytes(args.gpu_memory, "--gpu-memory") if args.gpu_memory else None
        if args.gpus is not None and args.gpus < 1:
            raise RnnifyError(f"--gpus {args.gpus}: accepted: a number of GPUs (processes) >= 1")
        if torch.cuda.is_available():
            gpus = gpus or torch.cuda.device_count()
            memory = memory or torch.cuda.get_device_properties(0).total_memory
        plan = plan_recipe(recipe, devices=gpus or 1, device_memory=memory, source=args.source,
                           strategy=args.strategy)
        print(plan.report())
        if memory is None:
            print("(no GPU here and no --gpu-memory: give --gpu-memory 80GiB for a verdict)")


def cmd_run(args) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    t0 = time.time()
    summary = run_recipe(recipe, only_stage=args.stage, resume=args.resume, fresh=args.fresh,
                         progress=not args.no_progress)
    if summary.get("finished") and "eval" in summary:
        print(results_table(summary["eval"]))
    elif not summary.get("finished"):
        print(f"stages run: {', '.join(summary['stages']) or 'none'}; the recipe has more (run them with --resume)")
    _log(f"rnnify run: {time.time() - t0:.0f}s")


def cmd_eval(args) -> None:
    flags = {"context_length": "--context-length", "num_windows": "--num-windows", "passkey_lengths": "--passkey",
             "speed_lengths": "--speed", "text": "--text", "recurrence": "--recurrence", "mqar_pairs": "--mqar",
             "tasks": "--tasks", "task_limit": "--limit", "continuations": "--continuations"}
    flat = lambda groups: [n for g in groups for n in g]  # noqa: E731  (1024,2048 4096 -> [1024, 2048, 4096])
    contexts = flat(args.context_length)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    try:
        spec = EvalSpec(text=args.text, context_length=contexts if len(contexts) > 1 else contexts[0],
                        num_windows=args.num_windows, passkey_lengths=flat(args.passkey),
                        speed_lengths=flat(args.speed), baseline=args.teacher is not None,
                        recurrence=flat(args.recurrence) if args.recurrence else None,
                        mqar_pairs=flat(args.mqar) if args.mqar else [], tasks=tasks,
                        include_path=args.include_path, task_limit=args.limit, continuations=args.continuations)
    except ValidationError as e:
        err = e.errors()[0]
        flag = flags.get(str(err["loc"][0]), str(err["loc"][0]))
        raise RnnifyError(f"{flag} {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}") from None

    if not Path(resolve_path(spec.text)).is_file():
        raise RnnifyError(f"--text {spec.text}: no such file; accepted: a text file or builtin:wikitext-2/test.txt")
    if args.include_path and not Path(args.include_path).is_dir():
        raise RnnifyError(f"--include-path {args.include_path}: not a folder (of lm-evaluation-harness task YAMLs)")
    if tasks:  # an unknown task fails before any model loads

        check_tasks(tasks, args.include_path)
    students, tok = {}, None
    for i, name in enumerate(args.model):
        model, t = sources.load_source(name, dtype="float32", progress=_log)
        if t is None:
            raise RnnifyError(f"{name} has no tokenizer files; save one next to the model")
        tok = tok or t
        label = "student" if len(args.model) == 1 else (Path(name).name or name)
        students[label if label not in students else f"{label}-{i}"] = model
    teacher = sources.load_source(args.teacher, dtype="float32", progress=_log)[0] if args.teacher else None
    results = evaluate(students, tok, spec, teacher=teacher, log=_log)
    if args.out is not None or (len(args.model) == 1 and Path(args.model[0]).is_dir()):
        folder = Path(args.out or args.model[0])
        folder.mkdir(parents=True, exist_ok=True)
        plots = write_eval(folder, results)
        _log(f"wrote {folder / 'eval.json'}, the README's Evaluation section" + (f" and {', '.join(plots)}" if plots
                                                                                  else ""))
    if args.json:
        print(json.dumps(results, indent=2, default=_jsonable))
    else:
        print(results_table(results))


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rnnify", description="Convert pretrained transformers into recurrent and hybrid models.")
    p.add_argument("--version", action="version", version=f"rnnify {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also RNNIFY_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = f"Hub repo id, local folder, .gguf file or alias ({', '.join(ALIASES)}); default {DEFAULT_MODEL}"

    def layer_choice(s):
        s.add_argument("--keep-attention", default=None,
                       help="layers that stay softmax attention, e.g. 0,15 or 0-3; or auto:N / auto:10%%@4096 (chosen "
                            "by measured layer scores, see rnnify select-layers)")
        s.add_argument("--select-text", default=None, help="text that auto:... scores layers on (default: "
                                                           "builtin:wikitext-2/valid.txt)")
        s.add_argument("--select-mode", choices=["restore", "convert"], default="restore",
                       help="how auto:... scores layers (default restore: KL-guided, see rnnify select-layers)")
        s.add_argument("--select-tokens", type=int, default=4096,
                       help="tokens of --select-text that auto:... scores on (default 4096)")
        s.add_argument("--attention-fraction", type=float, default=None,
                       help="share of layers that stay attention, spread evenly (e.g. 0.5, 0.25, 0.125, 0)")
        s.add_argument("--attention-every", type=int, default=None, help="every k-th layer stays attention")

    methods_help = ", ".join(f"{n}{' (transform)' if isinstance(m, Transform) else ''}" for n, m in sorted(METHODS.items()))
    s = sub.add_parser("inspect", help="architecture, layers, heads, parameters and attention modules of a model")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--method", default=None, help=f"also show the layer program and cache size of this conversion "
                                                   f"({methods_help})")
    layer_choice(s)
    add_method_flags(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("convert", help="convert a model's attention layers (surgery only, no training), or "
                                       "transform a converted model")
    s.add_argument("model", help=model_help + "; for a transform method, a converted (rnnify) model")
    s.add_argument("--method", required=True, help=f"one of: {methods_help}")
    layer_choice(s)
    s.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 for the saved weights")
    s.add_argument("--out", required=True, help="output folder (written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    s.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size (GB = 10^9 bytes, "
                                                              "GiB = 2^30)")
    add_method_flags(s)
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("select-layers", help="score every layer by what converting it costs (inference only) and "
                                             "choose which stay attention for a budget")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    s.add_argument("--method", required=True, help=f"one of: {methods_help}")
    s.add_argument("--budget-layers", type=int, default=None, help="keep this many layers as attention")
    s.add_argument("--budget-cache", default=None,
                   help="keep the most layers whose cache stays within P%% of the teacher's at L tokens, e.g. 10%%@4096")
    s.add_argument("--text", default="builtin:wikitext-2/valid.txt", help="text to score on (a .txt file)")
    s.add_argument("--tokens", type=int, default=4096, help="tokens of --text to score on")
    s.add_argument("--seq-len", type=int, default=None,
                   help="sequence length the tokens are cut into (default: the smaller of --tokens and 1024)")
    s.add_argument("--mode", choices=["restore", "convert"], default="restore",
                   help="restore (default): KL fall when each layer alone is restored to attention in an "
                        "all-converted model (KL-guided selection: measures layers where the hybrid lives); "
                        "convert: KL rise when each layer alone is converted")
    s.add_argument("--out", default="layer_scores", help="folder for layer_scores.json and layer_scores.png")
    add_method_flags(s)
    s.set_defaults(func=cmd_select_layers)

    s = sub.add_parser("export", help="save a mamba_in_llama hybrid as transformers' in-tree Bamba architecture")
    s.add_argument("model", help="a converted model folder")
    s.add_argument("--to", default="bamba", help="target architecture: bamba")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("push", help="upload a converted model folder to the Hugging Face Hub (one commit)")
    s.add_argument("folder")
    s.add_argument("repo_id", help="owner/name")
    s.add_argument("--private", action="store_true")
    s.add_argument("--revision", default="main", help="branch to commit to (created if needed)")
    s.add_argument("--message", default=None, help="commit message")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("cache", help="size of rnnify's caches (dequantized GGUF sources, packed tokens, layer "
                                     "scores); --clear removes them (each is rebuilt when needed)")
    s.add_argument("--clear", nargs="+", metavar="AREA", default=None,
                   help="areas to remove: sources, tokens, layer_scores, or all")
    s.set_defaults(func=cmd_cache)

    s = sub.add_parser("ls", help="shipped recipes, methods (with papers and options) and training stages")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("cp", help="copy a shipped recipe to edit")
    s.add_argument("name")
    s.add_argument("dest")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_cp)

    s = sub.add_parser("validate", help="check a recipe and print the resolved plan (no weights loaded)")
    s.add_argument("recipe", help="a recipe file or the name of a shipped recipe")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
    s.add_argument("--plan", action="store_true",
                   help="print the memory per GPU of each stage (weights, gradients, optimizer, activations) from the "
                        "source's config alone, and whether it fits")
    s.add_argument("--gpus", type=int, default=None, help="processes / GPUs to plan for (default: the GPUs here, or 1)")
    s.add_argument("--gpu-memory", default=None, help="memory of one GPU, e.g. 80GiB (GB = 10^9 bytes, GiB = 2^30; "
                                                             "default: this machine's GPU)")
    s.add_argument("--strategy", choices=["ddp", "fsdp"], default=None,
                   help="plan for this distributed strategy instead of the recipe's")
    s.add_argument("--source", default=None,
                   help="plan for another source model: a folder or config.json (weights not needed), alias or Hub id")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("run", help="convert + train + evaluate + save, as a recipe says")
    s.add_argument("recipe", help="a recipe file or the name of a shipped recipe")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200 stages.distill.lr=1e-4")
    s.add_argument("--stage", default=None, help="run only this stage (starting from the last finished earlier stage)")
    s.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    s.add_argument("--fresh", action="store_true",
                   help="start from the beginning although the run folder holds an earlier run (kept under a new name)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("eval", help="perplexity, recall, agreement with the teacher, tasks, speed and cache of one or "
                                    "more models, side by side with their teacher")
    s.add_argument("model", nargs="+", help="converted model folder(s) (or any models): several go in one table")
    s.add_argument("--teacher", default=None, help="the source model to compare with (and to build the window baseline)")
    s.add_argument("--text", default="builtin:wikitext-2/test.txt", help="text file for perplexity")
    s.add_argument("--context-length", "--context", type=_ints, nargs="+", default=[[2048]],
                   help="context length(s) for perplexity, e.g. 2048 or 2048,8192")
    s.add_argument("--num-windows", type=int, default=4)
    s.add_argument("--passkey", type=_ints, nargs="*", default=[[1024]], help="passkey lengths, e.g. 1024,2048,4096")
    s.add_argument("--speed", type=_ints, nargs="*", default=[[512, 2048]], help="context lengths for decode speed")
    s.add_argument("--recurrence", type=_ints, nargs="*", default=None,
                   help="looped models: perplexity and FLOPs per token at these loop counts, e.g. 1,2,4,8")
    s.add_argument("--mqar", type=_ints, nargs="*", default=None,
                   help="multi-query associative recall at these numbers of key-value pairs, e.g. 8,16,32,64")
    s.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, e.g. piqa,arc_easy (pip install "
                                                 "'rnnify[eval]')")
    s.add_argument("--include-path", default=None, help="a folder of task YAMLs for --tasks, as the harness's own CLI")
    s.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    s.add_argument("--continuations", type=int, default=4,
                   help="greedy continuations compared with the teacher's (0: none)")
    s.add_argument("--out", default=None, help="folder for eval.json and the plots (default: the model's folder when "
                                               "there is one model)")
    s.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="generate text from a model")
    s.add_argument("model", help=model_help + ", or a converted model folder")
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--recurrence", type=int, default=None, help="looped models: loops of the recurrent block")
    s.set_defaults(func=cmd_generate)
    return p


def _ints(text: str) -> list[int]:
    """'1024,2048' -> [1024, 2048] (argparse type: comma-separated integers)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (a usage dump is not what a user needs to fix a typo)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    """The error boundary: a user's mistake (RnnifyError) or an environment failure (OSError: disk full, no
    permission) ends in one line naming it; anything else is a bug and says so (--debug or RNNIFY_DEBUG=1 shows
    every traceback)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value overrides may follow options: rnnify run x.yaml --no-progress train.max_steps=1
            if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version, or a one-line usage error
        return e.code if isinstance(e.code, int) else 2
    debug = args.debug or os.environ.get("RNNIFY_DEBUG") == "1"
    where = f"rnnify {args.command}"
    try:
        args.func(args)
    except RnnifyError as e:
        if debug:
            raise
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            raise
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e) or type(e).__name__
        print(f"{where}: error: {what}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the boundary: a bug, said as one
        if debug:
            raise
        print(f"{where}: internal error: {type(e).__name__}: {e}\n(a bug in rnnify: rerun with --debug for the "
              "traceback and report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
