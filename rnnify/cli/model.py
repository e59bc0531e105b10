"""Commands on one model: ``inspect``, ``convert``, ``export``, ``push`` and ``generate``."""

from __future__ import annotations

import json
import time

from ..convert import SUPPORTED_MODEL_TYPES
from ..convert.flags import add_method_flags, options_from_args
from ..errors import RnnifyError
from ..export import to_bamba
from ..hub import push
from ..io import check_output_dir, write_model_folder
from ..modeling import RnnifyForCausalLM
from ..pipeline.convert_folder import convert_to_folder
from ..pipeline.describe import describe_model, ranges_by_value
from ..pipeline.generate import generate_text
from ..sources import DEFAULT_MODEL, load_source
from ..units import human_bytes
from .common import MODEL_HELP, add_layer_choice, layer_choice, log, methods_help


def inspect(args) -> None:
    t0 = time.time()
    info = describe_model(args.model, args.method, options=options_from_args(args) if args.method else None,
                          log=log, **layer_choice(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    student = "method" in info
    print(f"{args.model}  ({info['source']}: {info['path']})")
    print(f"  architecture     {info['architecture']}  (model_type {info['model_type']}"
          + (f", base {info['base_model_type']})" if student else ")"))
    print(f"  parameters       {info['parameters']:,}")
    print(f"  layers           {info['layers']}, hidden {info['hidden_size']}, vocab {info['vocab_size']}")
    print(f"  attention heads  {info['attention_heads']} query, {info['kv_heads']} key/value, head_dim {info['head_dim']}"
          + (f", sliding window {info['sliding_window']}" if info["sliding_window"] else ""))
    types = info["layer_types"] or ["full_attention"] * info["layers"]
    print(f"  layer types      {ranges_by_value(types)}")
    print(f"  token mixers     {info['attention_modules']}")
    if student:
        applied = "".join(f" + {t['method']}" for t in info["transforms"])
        print(f"  method           {info['method']}{applied}; mixer settings {info['mixer_config']}")
        print("  layer program")
        for line in info["program_lines"]:
            print(f"    {line}")
    for k, v in info["cache_bytes_per_sequence_bf16"].items():
        print(f"  cache @ {k:>3} tok  {human_bytes(v)} per sequence (bf16 K/V, fp32 states)")
    print("  FLOPs per token  " + "; ".join(f"{k + ': ' if k else ''}{v / 1e6:,.0f} M"
                                            for k, v in info["flops_per_token"].items())
          + " (forward, at a 2048-token context)")
    if not student:
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
    log(f"inspected in {time.time() - t0:.1f}s")


def convert(args) -> None:
    done = convert_to_folder(args.model, args.method, args.out, options=options_from_args(args), dtype=args.dtype,
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite, log=log,
                             **layer_choice(args))
    verb, added = ("transformed", "parameters added") if done.transform else ("converted", "new parameters")
    print(f"{verb} {args.model} with {args.method} -> {done.out}  ({done.seconds:.1f}s)")
    print(f"  layers kept as attention: {done.record['keep_attention'] or 'none'}; {added} {done.parameters_added:,}")
    print(f"  weights {human_bytes(done.weight_bytes)} ({done.record['dtype']})")
    before = "before" if done.transform else "teacher KV"
    for n, (after, then) in done.cache.items():
        ratio = f"{then / after:.1f}x less" if after <= then else f"{after / then:.2f}x more"
        print(f"  cache per sequence @ {n // 1024}k tokens: {human_bytes(after)} vs {before} {human_bytes(then)} ({ratio})")


def export(args) -> None:
    if args.to != "bamba":
        raise RnnifyError(f"--to {args.to!r}: accepted: bamba")
    out = check_output_dir(args.out, args.overwrite)
    student, tok = load_source(args.model, dtype=None, progress=log)
    if not isinstance(student, RnnifyForCausalLM):
        raise RnnifyError(f"{args.model} is not an rnnify model")
    bamba = to_bamba(student)
    write_model_folder(out, bamba, tok, overwrite=args.overwrite)
    print(f"exported {args.model} -> {out} (BambaForCausalLM, attention layers {bamba.config.attn_layer_indices})")


def push_folder(args) -> None:
    url = push(args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message)
    print(f"pushed {args.folder} -> {url}")


def generate(args) -> None:
    generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  chat=args.chat, dtype=args.dtype, seed=args.seed, recurrence=args.recurrence, log=log)


def add_parser(sub) -> None:
    s = sub.add_parser("inspect", help="architecture, layers, heads, parameters and attention modules of a model")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--method", default=None, help=f"also show the layer program and cache size of this conversion "
                                                   f"({methods_help()})")
    add_layer_choice(s)
    add_method_flags(s)
    s.set_defaults(func=inspect)

    s = sub.add_parser("convert", help="convert a model's attention layers (surgery only, no training), or "
                                       "transform a converted model")
    s.add_argument("model", help=MODEL_HELP + "; for a transform method, a converted (rnnify) model")
    s.add_argument("--method", required=True, help=f"one of: {methods_help()}")
    add_layer_choice(s)
    s.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 for the saved weights")
    s.add_argument("--out", required=True, help="output folder (written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    s.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size (GB = 10^9 bytes, "
                                                              "GiB = 2^30)")
    add_method_flags(s)
    s.set_defaults(func=convert)

    s = sub.add_parser("export", help="save a mamba_in_llama hybrid as transformers' in-tree Bamba architecture")
    s.add_argument("model", help="a converted model folder")
    s.add_argument("--to", default="bamba", help="target architecture: bamba")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=export)

    s = sub.add_parser("push", help="upload a converted model folder to the Hugging Face Hub (one commit)")
    s.add_argument("folder")
    s.add_argument("repo_id", help="owner/name")
    s.add_argument("--private", action="store_true")
    s.add_argument("--revision", default="main", help="branch to commit to (created if needed)")
    s.add_argument("--message", default=None, help="commit message")
    s.set_defaults(func=push_folder)

    s = sub.add_parser("generate", help="generate text from a model")
    s.add_argument("model", help=MODEL_HELP + ", or a converted model folder")
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--recurrence", type=int, default=None, help="looped models: loops of the recurrent block")
    s.set_defaults(func=generate)


__all__ = ["add_parser"]
