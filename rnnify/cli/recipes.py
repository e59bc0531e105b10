"""Commands on recipes: ``ls``, ``cp``, ``validate`` and ``run``."""

from __future__ import annotations

import time

from ..convert import METHODS
from ..convert.method import Transform, describe_options
from ..distill.data import check_data_files
from ..distill.stages import STAGES
from ..errors import RnnifyError
from ..eval.report import results_table
from ..pipeline.control import comparison_table, run_with_control
from ..pipeline.memory_plan import plan_here
from ..pipeline.plan import RunPlan
from ..pipeline.runner import run_recipe
from ..recipe import copy_recipe, dump_recipe, load_recipe, shipped_recipes
from .common import log


def ls(args) -> None:
    print("recipes:")
    for name, summary in shipped_recipes():
        print(f"  {name:<20} {summary}")
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


def cp(args) -> None:
    print(f"copied {args.name} -> {copy_recipe(args.name, args.dest, args.overwrite)}")


def validate(args) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    check_data_files(recipe.datasets)
    print(f"# {args.recipe}: valid. Resolved recipe:")
    print(dump_recipe(recipe), end="")
    print("# plan:")
    for line in RunPlan.of(recipe).describe():
        print(f"#   {line}")
    if args.plan or args.gpus is not None or args.gpu_memory or args.source or args.strategy:
        plan = plan_here(recipe, gpus=args.gpus, gpu_memory=args.gpu_memory, source=args.source, strategy=args.strategy)
        print(plan.report())
        if plan.device_memory is None:
            print("(no GPU here and no --gpu-memory: give --gpu-memory 80GiB for a verdict)")


def run(args) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    t0 = time.time()
    if args.control:
        if args.stage:
            raise RnnifyError("--control runs the whole recipe and its control; drop --stage")
        merged = run_with_control(recipe, resume=args.resume, fresh=args.fresh, progress=not args.no_progress, log=log)
        print(comparison_table(merged))
        log(f"rnnify run --control: {time.time() - t0:.0f}s")
        return
    summary = run_recipe(recipe, only_stage=args.stage, resume=args.resume, fresh=args.fresh,
                         progress=not args.no_progress)
    if summary.get("finished") and "eval" in summary:
        print(results_table(summary["eval"]))
    elif not summary.get("finished"):
        print(f"stages run: {', '.join(summary['stages']) or 'none'}; the recipe has more (run them with --resume)")
    log(f"rnnify run: {time.time() - t0:.0f}s")


def add_parser(sub) -> None:
    s = sub.add_parser("ls", help="shipped recipes, methods (with papers and options) and training stages")
    s.set_defaults(func=ls)

    s = sub.add_parser("cp", help="copy a shipped recipe to edit")
    s.add_argument("name")
    s.add_argument("dest")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cp)

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
    s.set_defaults(func=validate)

    s = sub.add_parser("run", help="convert + train + evaluate + save, as a recipe says")
    s.add_argument("recipe", help="a recipe file or the name of a shipped recipe")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200 stages.distill.lr=1e-4")
    s.add_argument("--stage", default=None, help="run only this stage (starting from the last finished earlier stage)")
    s.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    s.add_argument("--fresh", action="store_true",
                   help="start from the beginning although the run folder holds an earlier run (kept under a new name)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--control", action="store_true",
                   help="also run the recipe's control (the same run without its transforms, or untrained: the "
                        "recipe's control: key) into <output.dir>-control, and print both side by side")
    s.set_defaults(func=run)


__all__ = ["add_parser"]
