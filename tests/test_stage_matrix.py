"""The stage x method matrix: every registered training stage on every registered method where it makes sense, by
being registered. Each pair trains 2 steps of a recipe on a tiny model (finite losses, a finished output), the memory
plan traces the stage, and a run interrupted after its first step resumes to the same weights.

Which pairs make sense is read from the registries and the converted model, never listed: a stage whose default
trainable parameters are the conversion's new ones (``@new``) needs a method that adds some; attention transfer needs
layers whose mixer replaced an attention; self-distillation needs every mixer to run as the source attention.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rnnify.convert import METHODS, convert
from rnnify.convert.method import Transform
from rnnify.distill import trainer
from rnnify.distill.stages import STAGES
from rnnify.pipeline.memory_plan import plan_recipe
from rnnify.pipeline.runner import run_recipe
from rnnify.recipe import recipe_from_dict

from .conftest import tiny_model


def _conversion(method: str) -> dict:
    """The recipe's conversion block for ``method`` (a transform runs after its test source's conversion)."""
    m = METHODS[method]
    if isinstance(m, Transform):
        return {"method": m.test_source, "options": METHODS[m.test_source].test_options, "keep_attention": "1",
                "transforms": [{"method": method, "options": m.test_options}]}
    return {"method": method, "options": m.test_options, **({"keep_attention": "1"} if m.keeps_attention else {})}


def _student(method: str):
    c = _conversion(method)
    student = convert(tiny_model("llama"), c["method"], keep_attention=c.get("keep_attention"), options=c["options"])
    for t in c.get("transforms", []):
        student = convert(student, t["method"], options=t["options"])
    return student


def _makes_sense(stage: str, method: str) -> bool:
    spec, student = STAGES[stage], _student(method)
    mixers = [m for _, m in student.mixers()]
    if "@new" in spec.trainable and not student.new_parameter_names():
        return False
    if stage == "attention_transfer" and not mixers:
        return False
    if stage == "self_distill" and not (mixers and all(m.can_run_as_source for m in mixers)):
        return False
    return True


PAIRS = [(s, m) for s in STAGES for m in sorted(METHODS) if _makes_sense(s, m)]


def _recipe(workdir, stage: str, method: str):
    return recipe_from_dict({
        "name": "matrix", "seed": 0,
        "model": {"source": str(workdir / "src")},
        "conversion": _conversion(method),
        "datasets": {"d": {"path": str(workdir / "data.txt")}},
        "train": {"seq_len": 32, "batch_size": 2, "checkpoint_every": 1},
        "stages": [{"type": stage, "max_steps": 2, "lr": 0.01}],
        "output": {"dir": str(workdir / "out")},
    })


def test_the_matrix_covers_every_stage_and_method():
    assert {s for s, _ in PAIRS} == set(STAGES)
    assert {m for _, m in PAIRS} == set(METHODS)


@pytest.mark.parametrize("stage,method", PAIRS, ids=[f"{s}-{m}" for s, m in PAIRS])
def test_stage_trains_plans_and_resumes_on_method(workdir, monkeypatch, stage, method):
    recipe = _recipe(workdir, stage, method)
    plan = plan_recipe(recipe, devices=1, device_memory=None, cuda=False)
    assert [p.stage for p in plan.stages] == [stage] and plan.stages[0].activations > 0

    summary = run_recipe(recipe, progress=False)
    rows = [json.loads(line) for line in (workdir / "out.run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["finished"] and [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    reference = load_file(str(workdir / "out" / "model.safetensors"))

    shutil.rmtree(workdir / "out")
    shutil.rmtree(workdir / "out.run")

    def crash(name, step):
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_BEFORE_STEP", crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(workdir, stage, method), progress=False)
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    run_recipe(_recipe(workdir, stage, method), resume=True, progress=False)
    resumed = load_file(str(workdir / "out" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-6, msg=k)
