"""``eval``: perplexity, recall, agreement, tasks, speed and cache of models side by side."""

from __future__ import annotations

import json

from pydantic import ValidationError

from ..errors import RnnifyError
from ..eval.report import _jsonable, results_table
from ..eval.spec import EvalSpec
from ..pipeline.evaluate_models import evaluate_models
from .common import flat, ints, log

FLAGS = {"context_length": "--context-length", "num_windows": "--num-windows", "passkey_lengths": "--passkey",
         "speed_lengths": "--speed", "text": "--text", "recurrence": "--recurrence", "mqar_pairs": "--mqar",
         "mqar_trials": "--mqar-trials", "mqar_seed": "--mqar-seed", "passkey_trials": "--passkey-trials", "tasks": "--tasks",
         "task_limit": "--limit", "continuations": "--continuations", "include_path": "--include-path"}


def spec_from_args(args) -> EvalSpec:
    """The ``EvalSpec`` the flags describe; a value it refuses is named by its flag."""
    contexts = flat(args.context_length)
    try:
        return EvalSpec(text=args.text if len(args.text) > 1 else args.text[0],
                        context_length=contexts if len(contexts) > 1 else contexts[0],
                        num_windows=args.num_windows, passkey_lengths=flat(args.passkey),
                        speed_lengths=flat(args.speed), baseline=args.teacher is not None,
                        recurrence=flat(args.recurrence) if args.recurrence else None,
                        mqar_pairs=flat(args.mqar) if args.mqar else [], mqar_trials=args.mqar_trials,
                        mqar_seed=args.mqar_seed, passkey_trials=args.passkey_trials,
                        tasks=[t.strip() for t in (args.tasks or "").split(",") if t.strip()],
                        include_path=args.include_path, task_limit=args.limit, continuations=args.continuations)
    except ValidationError as e:
        err = e.errors()[0]
        flag = FLAGS.get(str(err["loc"][0]), str(err["loc"][0]))
        raise RnnifyError(f"{flag} {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}") from None


def run(args) -> None:
    results = evaluate_models(args.model, spec_from_args(args), teacher=args.teacher, out=args.out, log=log)
    print(json.dumps(results, indent=2, default=_jsonable) if args.json else results_table(results))


def add_parser(sub) -> None:
    s = sub.add_parser("eval", help="perplexity, recall, agreement with the teacher, tasks, speed and cache of one or "
                                    "more models, side by side with their teacher")
    s.add_argument("model", nargs="+", help="converted model folder(s) (or any models): several go in one table")
    s.add_argument("--teacher", default=None, help="the source model to compare with (and to build the window baseline)")
    s.add_argument("--text", nargs="+", default=["builtin:wikitext-2/test.txt"],
                   help="text file(s) for perplexity: several are measured side by side (the first is also the one "
                        "agreement with the teacher reads)")
    s.add_argument("--context-length", "--context", type=ints, nargs="+", default=[[2048]],
                   help="context length(s) for perplexity, e.g. 2048 or 2048,8192")
    s.add_argument("--num-windows", type=int, default=4)
    s.add_argument("--passkey", type=ints, nargs="*", default=[[1024]], help="passkey lengths, e.g. 1024,2048,4096")
    s.add_argument("--speed", type=ints, nargs="*", default=[[512, 2048]], help="context lengths for decode speed")
    s.add_argument("--recurrence", type=ints, nargs="*", default=None,
                   help="looped models: perplexity and FLOPs per token at these loop counts, e.g. 1,2,4,8")
    s.add_argument("--mqar", type=ints, nargs="*", default=None,
                   help="multi-query associative recall at these numbers of key-value pairs, e.g. 8,16,32,64")
    s.add_argument("--mqar-trials", type=int, default=EvalSpec.model_fields["mqar_trials"].default,
                   help="MQAR trials per number of pairs (8 queries each, fresh pairs each trial; the standard error "
                        "shrinks as 1/sqrt(trials)); the same seed gives every model the same prompts")
    s.add_argument("--mqar-seed", type=int, default=EvalSpec.model_fields["mqar_seed"].default,
                   help="seed of the MQAR prompts (default 0, the seed recipes evaluate with): another seed judges "
                        "models again on fresh prompts; with two models the table adds their paired difference")
    s.add_argument("--passkey-trials", type=int, default=EvalSpec.model_fields["passkey_trials"].default,
                   help="passkey trials per length (the key at a different depth each trial)")
    s.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, e.g. piqa,arc_easy (pip install "
                                                 "'rnnify[eval]')")
    s.add_argument("--include-path", default=None, help="a folder of task YAMLs for --tasks, as the harness's own CLI")
    s.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    s.add_argument("--continuations", type=int, default=4,
                   help="greedy continuations compared with the teacher's (0: none)")
    s.add_argument("--out", default=None, help="folder for eval.json and the plots (default: the model's folder when "
                                               "there is one model)")
    s.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    s.set_defaults(func=run)


__all__ = ["add_parser"]
