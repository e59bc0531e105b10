"""``rnnify run --control``: a recipe and its control differ only in what the control leaves out (the transforms, or
the training), read the same blocks in the same order with the same seed, and the side-by-side table's columns are
the two runs' own evaluations. Also ``conversion.start_from`` (post-training a converted model, as StateX does)."""

import json
import statistics

import pytest
import torch
import yaml

from rnnify.cli import main
from rnnify.distill.token_cache import PackedBlocks
from rnnify.errors import RnnifyError
from rnnify.pipeline import runner
from rnnify.pipeline.control import compare, control_recipe, run_with_control
from rnnify.recipe import recipe_from_dict

EVAL = {"text": "data.txt", "context_length": 32, "num_windows": 2, "mqar_pairs": [2], "mqar_trials": 2,
        "passkey_lengths": [], "speed_lengths": [], "continuations": 0}


def _recipe(workdir, **conversion):
    conv = {"method": "ahn", "options": {"window": 4, "sinks": 1, "chunk_size": 8},
            "transforms": [{"method": "statex", "options": {"layers": "all", "init": "keep"}}]}
    conv.update(conversion)
    return recipe_from_dict({
        "name": "pair", "seed": 3,
        "model": {"source": str(workdir / "src")},
        "conversion": conv,
        "datasets": {"d": {"path": str(workdir / "data.txt")}},
        "train": {"seq_len": 32, "batch_size": 2},
        "stages": [{"type": "self_distill", "max_steps": 3, "lr": 0.01}],
        "output": {"dir": str(workdir / "out")},
        "eval": {**EVAL, "text": str(workdir / "data.txt")},
    })


def test_the_control_leaves_out_only_the_transform_and_reads_the_same_blocks(workdir, monkeypatch, capsys):
    read, seeds = [], []
    real_get = PackedBlocks.__getitem__
    monkeypatch.setattr(PackedBlocks, "__getitem__", lambda self, idx: read.append(real_get(self, idx)) or read[-1])
    real_train = runner.train_stage
    monkeypatch.setattr(runner, "train_stage", lambda **kw: seeds.append(kw["seed"]) or real_train(**kw))
    recipe = _recipe(workdir)
    merged = run_with_control(recipe, progress=False, log=lambda *_: None)

    # the same blocks, in the same order, under the same seed
    half = len(read) // 2  # a batch of 2 blocks a step, 3 steps a run
    assert half == 3 and read[0].shape[0] == 2 and all(torch.equal(a, b) for a, b in zip(read[:half], read[half:]))
    assert seeds == [3, 3]
    # the recipes differ in the transforms, the name and the output folder, and in nothing else
    run_dump = yaml.safe_load((workdir / "out" / "recipe.yaml").read_text())
    ctl_dump = yaml.safe_load((workdir / "out-control" / "recipe.yaml").read_text())
    assert run_dump["conversion"].pop("transforms") and ctl_dump["conversion"].pop("transforms") == []
    for d in (run_dump, ctl_dump):
        d.pop("name"), d.pop("output"), d.pop("control")
    assert run_dump == ctl_dump
    run_cfg = json.loads((workdir / "out" / "config.json").read_text())
    ctl_cfg = json.loads((workdir / "out-control" / "config.json").read_text())
    assert [t["method"] for t in run_cfg["transforms"]] == ["statex"] and ctl_cfg["transforms"] == []

    # the table's columns are the two runs' own figures; the teacher and window baseline come from the run
    run_eval = json.loads((workdir / "out" / "eval.json").read_text())
    ctl_eval = json.loads((workdir / "out-control" / "eval.json").read_text())
    assert merged["columns"] == ["teacher", "pair", "pair-control", "window_baseline"]
    p = merged["perplexity"]
    assert p["pair"] == run_eval["perplexity"]["student"] and p["pair-control"] == ctl_eval["perplexity"]["student"]
    assert p["teacher"] == run_eval["perplexity"]["teacher"]
    assert p["window_baseline"] == run_eval["perplexity"]["window_baseline"]
    assert p["pair"] != p["pair-control"]  # the transform changed what was trained
    gap = p["window_baseline"] - p["teacher"]
    assert p["recovered"]["pair-control"] == pytest.approx((p["window_baseline"] - p["pair-control"]) / gap)
    m = merged["mqar"]["2"]
    assert m["pair"] == run_eval["mqar"]["2"]["student"] and m["pair-control"] == ctl_eval["mqar"]["2"]["student"]
    assert m["stderr"]["pair-control"] == ctl_eval["mqar"]["2"]["stderr"]["student"]
    # both answered the same prompts: the difference is taken trial by trial (checked with the statistics module)
    a, b = run_eval["mqar"]["2"]["per_trial"]["student"], ctl_eval["mqar"]["2"]["per_trial"]["student"]
    assert m["per_trial"]["pair"] == a and m["per_trial"]["pair-control"] == b and len(a) == EVAL["mqar_trials"]
    diffs = [x - y for x, y in zip(a, b)]
    assert m["paired_difference"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert m["paired_difference"]["stderr"] == pytest.approx(statistics.stdev(diffs) / len(diffs) ** 0.5)
    on_disk = json.loads((workdir / "out-control" / "comparison.json").read_text())
    assert on_disk["perplexity"]["pair-control"] == p["pair-control"]
    table = (workdir / "out-control" / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| measurement"))
    assert header == "| measurement | teacher | pair | pair-control | window baseline |"
    paired = next(line for line in table.splitlines() if "paired over the same 2 trials" in line)
    d = m["paired_difference"]
    assert paired.startswith("| MQAR, 2 pairs: pair minus pair-control")
    assert paired.split(" | ")[2:4] == [f"{100 * d['mean']:+.1f}% ±{100 * d['stderr']:.1f}", "—"]


def test_an_untrained_control_is_the_conversion_as_it_starts(workdir):
    recipe = recipe_from_dict({
        "name": "loop", "model": {"source": str(workdir / "src")},
        "conversion": {"method": "retrofit", "options": {"prelude": "0", "block": "1-2", "coda": "3",
                                                         "recurrence": 2, "state_init": "zeros"}},
        "datasets": {"d": {"path": str(workdir / "data.txt")}},
        "stages": [{"type": "finetune", "max_steps": 2, "lr": 0.01, "seq_len": 32, "batch_size": 2,
                    "recurrence": {"mean": 2, "backprop": 1}}],
        "output": {"dir": str(workdir / "out")},
        "eval": {**EVAL, "text": str(workdir / "data.txt"), "mqar_pairs": [], "baseline": False,
                 "recurrence": [1, 2]},
    })
    control = control_recipe(recipe)
    assert control.stages == [] and control.output.dir == str(workdir / "out-control")
    merged = run_with_control(recipe, progress=False, log=lambda *_: None)
    assert not (workdir / "out-control.run" / "metrics.jsonl").exists()  # nothing trained
    run_eval = json.loads((workdir / "out" / "eval.json").read_text())
    ctl_eval = json.loads((workdir / "out-control" / "eval.json").read_text())
    assert merged["looped"]["loop"]["recurrence"] == run_eval["recurrence"]
    assert merged["looped"]["loop-control"]["recurrence"] == ctl_eval["recurrence"]
    assert run_eval["recurrence"]["2"]["ppl"] != ctl_eval["recurrence"]["2"]["ppl"]
    table = (workdir / "out-control" / "comparison.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 2 |"))
    assert f"{run_eval['recurrence']['2']['ppl']:.2f} | {ctl_eval['recurrence']['2']['ppl']:.2f}" in row


def test_the_comparison_refuses_runs_judged_on_different_text():
    a = {"columns": ["teacher", "student"], "perplexity": {"teacher": 10.0, "student": 12.0, "text": "a"}}
    b = {"columns": ["teacher", "student"], "perplexity": {"teacher": 11.0, "student": 12.5, "text": "b"}}
    with pytest.raises(RnnifyError, match="not judged alike"):
        compare(a, b, "run", "control")
    with pytest.raises(RnnifyError, match="eval"):
        compare(a, None, "run", "control")


def test_control_needs_something_to_leave_out(workdir):
    data = _recipe(workdir).model_dump(mode="json")
    data["conversion"]["transforms"] = []
    data["control"] = "without_transforms"
    with pytest.raises(RnnifyError, match="control: without_transforms .* accepted here: untrained"):
        recipe_from_dict(data)


def test_start_from_post_trains_a_converted_model_and_names_a_wrong_one(workdir, tiny_llama_dir):
    assert main(["convert", str(workdir / "src"), "--method", "ahn", "--out", str(workdir / "ahn"),
                 "--window", "4", "--sinks", "1", "--chunk-size", "8"]) == 0
    recipe = _recipe(workdir, start_from=str(workdir / "ahn"), options={})
    control = control_recipe(recipe)
    assert control.conversion.start_from == str(workdir / "ahn") and control.conversion.transforms == []
    from rnnify.pipeline.student import recipe_student
    from rnnify.sources import load_source

    teacher = load_source(str(workdir / "src"), progress=lambda *_: None)[0]
    converted = load_source(str(workdir / "ahn"), progress=lambda *_: None)[0]
    with torch.no_grad():  # the converted folder's own memory weights, not a fresh conversion's
        converted.model.layers[0].self_attn.out_heads.fill_(0.25)
    converted.save_pretrained(workdir / "ahn")
    student = recipe_student(control, teacher)
    assert torch.equal(student.model.layers[0].self_attn.out_heads, converted.model.layers[0].self_attn.out_heads)
    assert student.model.layers[1].self_attn.merged is False
    expanded = recipe_student(recipe, teacher)
    assert expanded.model.layers[1].self_attn.merged is True

    wrong = dict(recipe.conversion.model_dump(mode="json"), method="supra")
    with pytest.raises(RnnifyError, match="converted with 'ahn', and conversion.method says 'supra'"):
        recipe_student(recipe.model_copy(update={"conversion": type(recipe.conversion)(**wrong)}), teacher)
    plain = dict(recipe.conversion.model_dump(mode="json"), start_from=str(workdir / "src"))
    with pytest.raises(RnnifyError, match="is not an rnnify model"):
        recipe_student(recipe.model_copy(update={"conversion": type(recipe.conversion)(**plain)}), teacher)
    other = load_source(str(tiny_llama_dir), progress=lambda *_: None)[0]
    other.config.num_hidden_layers = 2  # a different source: the folder was not converted from it
    with pytest.raises(RnnifyError, match="num_hidden_layers is 4, the source's 2"):
        recipe_student(recipe, other)
    with pytest.raises(RnnifyError, match="start_from: .* drop keep_attention"):
        recipe_from_dict({**recipe.model_dump(mode="json"),
                          "conversion": {**recipe.conversion.model_dump(mode="json"), "keep_attention": [0]}})


def test_a_missing_start_is_named_before_any_weights_load(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    recipe = _recipe(workdir, start_from="out/ahn_cpu", options={})
    with pytest.raises(RnnifyError, match="start_from: .*out/ahn_cpu.* `rnnify run ahn_cpu` writes: run that first"):
        runner.run_recipe(recipe, progress=False)
    assert not (workdir / "out.run").exists()  # nothing written that looks like a started run
