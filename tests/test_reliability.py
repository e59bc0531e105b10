"""A user's mistakes end in one line naming the input and what is accepted; nothing finished is ever lost; damaged
state is never used silently. Each case checks the exit status, the message and the files before and after."""

import errno
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rnnify import sources
from rnnify.cli import main
from rnnify.distill import trainer
from rnnify.errors import RnnifyError
from rnnify.pipeline.runner import run_recipe
from rnnify.recipe import recipe_from_dict

from .conftest import make_tokenizer, tiny_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str, needle: str, command: str):
    """The error is one line, the last thing printed (progress lines of work done before it may precede it)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and sum(line.startswith("rnnify ") for line in lines) == 1, err
    assert lines[-1].startswith(f"rnnify {command}: error: ") and needle in lines[-1], lines[-1]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- work lost
def test_overwrite_never_deletes_a_folder_that_holds_no_model(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    code, _, err = run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", out, "--overwrite")
    assert code == 2
    one_line(err, "is not empty and holds no model", "convert")
    assert snapshot(out) == before


def test_overwrite_replaces_a_model_but_not_the_users_files_beside_it(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, _, err = run(capsys, "convert", tiny_llama_dir, "--method", "lolcats", "--out", out, "--overwrite")
    assert code == 2
    one_line(err, "also holds other files (notes.txt)", "convert")
    assert snapshot(out) == before
    (out / "notes.txt").unlink()
    assert run(capsys, "convert", tiny_llama_dir, "--method", "lolcats", "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "config.json").read_text())["method"] == "lolcats"


@pytest.fixture
def workdir(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src")
    make_tokenizer(128).save_pretrained(tmp_path / "src")
    rng = random.Random(0)
    lines = [" ".join(f"w{(i * 7 + j) % 23}" for j in range(rng.randint(20, 40))) for i in range(200)]
    (tmp_path / "data.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def recipe_dict(workdir, stages=None, **extra):
    return {
        "name": "tiny", "seed": 0,
        "model": {"source": str(workdir / "src")},
        "conversion": {"method": "supra", "options": {"chunk_size": 16}},
        "datasets": {"d": {"path": str(workdir / "data.txt")}},
        "train": {"seq_len": 32, "batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 3},
        "stages": stages or [{"type": "distill", "max_steps": 6, "lr": 0.01}],
        "output": {"dir": str(workdir / "out")},
        **extra,
    }


def write_recipe(workdir, **kw):
    import yaml

    path = workdir / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(workdir, **kw)))
    return path


def crash_at(stage_name, at_step):
    def hook(stage, step):
        if stage == stage_name and step == at_step:
            raise KeyboardInterrupt
    return hook


def test_a_rerun_never_destroys_an_interrupted_runs_checkpoints(workdir, capsys, monkeypatch):
    path = write_recipe(workdir)
    monkeypatch.setattr(trainer, "_BEFORE_STEP", crash_at("distill", 5))
    assert run(capsys, "run", path, "--no-progress")[0] == 130
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    state = workdir / "out.run"
    before = snapshot(state)
    assert any("checkpoints/distill/step-0000005" in k for k in before)  # written at the interrupt
    # a typo in the source, without --resume: refused before anything is loaded, the old state untouched
    code, _, err = run(capsys, "run", path, "--no-progress", "model.source=/nowhere/typo")
    assert code == 2
    one_line(err, "holds an earlier run of this recipe (finished stages: none; checkpoint checkpoints/distill/"
                  "step-0000005); continue it with --resume, or start afresh with --fresh", "run")
    assert snapshot(state) == before
    # --fresh keeps the earlier run folder under a new name
    code, _, err = run(capsys, "run", path, "--no-progress", "--fresh")
    assert code == 0, err
    kept = [p for p in workdir.iterdir() if p.name.startswith("out.run.old-")]
    assert len(kept) == 1 and snapshot(kept[0]) == before


def _damage(path, how):
    data = path.read_bytes()
    if how == "swapped":  # a valid file of the same kind, from the previous checkpoint of the same run
        shutil.copyfile(path.parent.with_name("step-0000004") / path.name, path)
    elif how == "edited":  # valid JSON, another data position: the step is not the one the weights were saved at
        meta = json.loads(data)
        meta["step"] = 3
        path.write_text(json.dumps(meta))
    elif how == "zeroed":  # tensor bytes zeroed, header intact
        path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "garbled":
        path.write_text("{ not json")


@pytest.mark.parametrize("file,how", [("trainable.safetensors", "zeroed"), ("optim.pt", "truncated"),
                                      ("meta.json", "garbled"), ("trainable.safetensors", "truncated"),
                                      ("optim.pt", "swapped"), ("trainable.safetensors", "swapped"),
                                      ("meta.json", "edited")])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(workdir, monkeypatch, capsys, file, how):
    r = recipe_from_dict(recipe_dict(workdir))
    run_recipe(r, progress=False)
    reference = load_file(str(workdir / "out" / "model.safetensors"))
    shutil.rmtree(workdir / "out")
    shutil.rmtree(workdir / "out.run")
    monkeypatch.setattr(trainer, "_BEFORE_STEP", crash_at("distill", 5))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(r, progress=False)
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    ckpts = sorted((workdir / "out.run" / "checkpoints" / "distill").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004", "step-0000005"]
    _damage(ckpts[-1] / file, how)
    capsys.readouterr()
    run_recipe(r, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "step-0000005" in out and "trying the previous checkpoint" in out and "resuming from step-0000004" in out
    resumed = load_file(str(workdir / "out" / "model.safetensors"))
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-6, msg=k)


class _RunsCode:
    """A pickle that runs code when unpickled (what a shared run folder could hold)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_holding_a_pickle_that_runs_code_is_refused_without_running_it(workdir, monkeypatch, capsys):
    import hashlib

    path = write_recipe(workdir)
    monkeypatch.setattr(trainer, "_BEFORE_STEP", crash_at("distill", 5))
    assert run(capsys, "run", path, "--no-progress")[0] == 130
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    ckpt = workdir / "out.run" / "checkpoints" / "distill" / "step-0000005"
    marker = workdir / "code-ran"
    good = torch.load(ckpt / "optim.pt", weights_only=True)
    torch.save({**good, "optimizer": _RunsCode(marker)}, ckpt / "optim.pt")
    # whoever shares the folder can also update every checksum in meta.json
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["optim.pt"] = hashlib.sha256((ckpt / "optim.pt").read_bytes()).hexdigest()
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["meta_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    code, out, err = run(capsys, "run", path, "--no-progress", "--resume")
    assert code == 2 and not marker.exists()
    one_line(err, f"refusing {ckpt / 'optim.pt'}: it holds pickled objects other than tensors", "run")
    assert not (workdir / "out" / "model.safetensors").exists()


def test_when_every_checkpoint_is_damaged_the_run_stops_clearly(workdir, monkeypatch):
    r = recipe_from_dict(recipe_dict(workdir))
    monkeypatch.setattr(trainer, "_BEFORE_STEP", crash_at("distill", 3))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(r, progress=False)
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    for ckpt in (workdir / "out.run" / "checkpoints" / "distill").glob("step-*"):
        _damage(ckpt / "trainable.safetensors", "zeroed")
    with pytest.raises(RnnifyError, match="every checkpoint is damaged"):
        run_recipe(r, resume=True, progress=False)
    assert not (workdir / "out").exists()


def test_a_damaged_finished_stage_or_run_state_is_named(workdir):
    stages = [{"type": "attention_transfer", "max_steps": 2, "lr": 0.01}, {"type": "distill", "max_steps": 2}]
    r = recipe_from_dict(recipe_dict(workdir, stages=stages))
    run_recipe(r, only_stage="attention_transfer", progress=False)
    _damage(workdir / "out.run" / "stages" / "attention_transfer" / "model.safetensors", "zeroed")
    with pytest.raises(RnnifyError, match="weights of finished stage attention_transfer .* are damaged"):
        run_recipe(r, resume=True, progress=False)
    (workdir / "out.run" / "state.json").write_text("{garbled")
    with pytest.raises(RnnifyError, match="run state .*state.json cannot be read"):
        run_recipe(r, resume=True, progress=False)


# ------------------------------------------------------------------------------------------- one-line errors
def _broken_source(tiny_llama_dir, tmp_path, how):
    src = tmp_path / f"src-{how}"
    shutil.copytree(tiny_llama_dir, src)
    if how == "empty-config":
        (src / "config.json").write_text("")
    elif how == "garbled-config":
        (src / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    elif how == "truncated-weights":
        _damage(src / "model.safetensors", "truncated")
    elif how == "no-weights":
        (src / "model.safetensors").unlink()
    elif how == "unknown-mixer":
        pass
    return src


@pytest.mark.parametrize("how,needle", [
    ("empty-config", "config.json cannot be read as a transformers config"),
    ("garbled-config", "config.json cannot be read as a transformers config"),
    ("truncated-weights", "is damaged or truncated"),
    ("no-weights", "has no weights"),
])
@pytest.mark.parametrize("command", ["convert", "generate", "inspect"])
def test_broken_sources(tiny_llama_dir, tmp_path, capsys, how, needle, command):
    src = _broken_source(tiny_llama_dir, tmp_path, how)
    if command == "inspect" and how in ("truncated-weights", "no-weights"):
        pytest.skip("inspect reads the config only")
    argv = {"convert": ["convert", src, "--method", "supra", "--out", tmp_path / "o"],
            "generate": ["generate", src, "w1 w2"], "inspect": ["inspect", src]}[command]
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_line(err, needle, command)
    assert not (tmp_path / "o").exists()


def test_a_saved_model_naming_an_unknown_mixer(tiny_llama_dir, tmp_path, capsys):
    assert run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", tmp_path / "m")[0] == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["program"][1]["mixer"] = "hyena"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", tmp_path / "m", "w1")
    assert code == 2
    from rnnify.modeling import MIXERS

    one_line(err, f"unknown mixer 'hyena'; accepted: attention, {', '.join(sorted(MIXERS))}", "generate")


def test_output_under_a_file_or_an_unwritable_place(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", tmp_path / "afile" / "sub")
    assert code == 2
    one_line(err, "is a file, not a folder", "convert")
    code, _, err = run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", "/proc/rnnify-test/out")
    assert code == 2
    one_line(err, "/proc does not accept new folders", "convert")


def test_disk_full_while_writing_keeps_the_old_model(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from rnnify.modeling import RnnifyForCausalLM

    out = tmp_path / "m"
    assert run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", out)[0] == 0
    before = snapshot(out)

    def full(self, path, *a, **k):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.safetensors"))

    monkeypatch.setattr(RnnifyForCausalLM, "save_pretrained", full)
    code, _, err = run(capsys, "convert", tiny_llama_dir, "--method", "lolcats", "--out", out, "--overwrite")
    assert code == 1
    one_line(err, "No space left on device", "convert")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tiny-llama"]


def test_bad_shard_size_is_refused_before_loading(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "load_source", lambda *a, **k: pytest.fail("weights loaded before the check"))
    code, _, err = run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--max-shard-size", "banana",
                       "--out", tmp_path / "o")
    assert code == 2
    one_line(err, "--max-shard-size 'banana' is not a size; accepted: a number and a unit", "convert")


@pytest.mark.parametrize("argv,needle", [
    (["", ], "the prompt is empty"),
    (["  ", ], "the prompt is empty"),
    (["w1", "--max-new-tokens", "0"], "--max-new-tokens 0: accepted: an integer >= 1"),
    (["w1", "--max-new-tokens", "-3"], "--max-new-tokens -3: accepted: an integer >= 1"),
])
def test_generate_arguments(tiny_llama_dir, capsys, argv, needle):
    code, _, err = run(capsys, "generate", tiny_llama_dir, *argv)
    assert code == 2
    one_line(err, needle, "generate")


def test_push_checks_locally(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import rnnify.hub

    calls = []
    monkeypatch.setattr(rnnify.hub, "HfApi", lambda token=None: calls.append("api") or pytest.fail("network"))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", tmp_path / "m")[0] == 0
    code, _, err = run(capsys, "push", tmp_path / "m", "user/x", "--revision", "bad name..x")
    assert code == 2
    one_line(err, "--revision 'bad name..x' is not a valid branch name", "push")
    (tmp_path / "m" / "config.json").write_text("{oops")
    code, _, err = run(capsys, "push", tmp_path / "m", "user/x")
    assert code == 2
    one_line(err, "config.json is not valid JSON", "push")
    assert calls == []


def test_recipe_mistakes_fail_validate(workdir, capsys):
    path = write_recipe(workdir)
    code, _, err = run(capsys, "validate", path, "stages.distill.lr=-0.001")
    assert code == 2 and "lr: Input should be greater than 0" in err
    code, _, err = run(capsys, "validate", path, f"datasets.d.path={workdir / 'missing.txt'}")
    assert code == 2
    one_line(err, "data file", "validate")
    assert "missing.txt does not exist" in err
    (workdir / "empty.jsonl").write_text("")
    code, _, err = run(capsys, "validate", path, f"datasets.d.path={workdir / 'empty.jsonl'}")
    assert code == 2 and "is empty" in err
    (workdir / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(RnnifyError, match="could not load it as json"):
        from rnnify.distill.data import pack_tokens
        from rnnify.recipe import DataSpec

        pack_tokens(DataSpec(path=str(workdir / "bad.jsonl")), make_tokenizer(128), 8)


def test_overrides_may_follow_options(workdir, capsys):
    path = write_recipe(workdir)
    code, out, err = run(capsys, "validate", path, "train.max_steps=3")
    assert code == 0 and "3 steps" in out
    code, out, err = run(capsys, "run", path, "--no-progress", "train.max_steps=1", "output.dir=" + str(workdir / "o1"))
    assert code == 0, err
    assert (workdir / "o1" / "model.safetensors").exists()
    code, _, err = run(capsys, "run", path, "--no-progress", "--bogus")
    assert code == 2 and err.strip().count("\n") == 0 and "unrecognized arguments: --bogus" in err


def test_seq_len_beyond_the_sources_positions_warns(workdir, capsys):
    r = recipe_from_dict(recipe_dict(workdir, stages=[{"type": "distill", "max_steps": 1, "seq_len": 600}]))
    run_recipe(r, progress=False)
    assert "beyond the source's max_position_embeddings 512" in capsys.readouterr().err


def test_a_bug_says_it_is_one_and_debug_shows_the_traceback(tiny_llama_dir, capsys, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(sources, "load_source", boom)
    code, _, err = run(capsys, "generate", tiny_llama_dir, "w1")
    assert code == 1 and "internal error: ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "generate", str(tiny_llama_dir), "w1"])


# ------------------------------------------------------------------------------------------- planted bugs
def test_distill_loss_is_forward_kl_at_the_temperature_against_an_independent_computation():
    from rnnify.convert import convert
    from rnnify.distill.stages import DistillObjective

    teacher = tiny_model("llama")
    student = convert(teacher, "supra", options={"chunk_size": 8})
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        t, s = teacher(x).logits.double(), student(x).logits.double()
    for kl, tau in (("forward", 1.0), ("forward", 2.0), ("reverse", 1.0), ("reverse", 3.0)):
        got, _ = DistillObjective(student, teacher, temperature=tau, kl=kl)(x)
        pt, ps = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
        if kl == "forward":  # KL(teacher || student)
            want = (pt * (pt.log() - ps.log())).sum(-1).mean() * tau**2
        else:
            want = (ps * (ps.log() - pt.log())).sum(-1).mean() * tau**2
        assert abs(got.item() - want.item()) < 1e-5 * max(1.0, want.item()), (kl, tau, got.item(), want.item())


def test_gradient_accumulation_gives_the_weights_of_the_whole_batch(workdir):
    finals = []
    for batch, accum in ((4, 1), (2, 2)):
        out = workdir / f"out{batch}"
        d = recipe_dict(workdir, stages=[{"type": "distill", "max_steps": 3, "lr": 0.01, "batch_size": batch,
                                          "grad_accum": accum}])
        d["output"] = {"dir": str(out)}
        run_recipe(recipe_from_dict(d), progress=False)
        finals.append(load_file(str(out / "model.safetensors")))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=2e-6, rtol=1e-5, msg=k)


def test_model_card_cache_rows_are_computed_at_their_lengths():
    from rnnify.cache_size import cache_bytes
    from rnnify.card import cache_table, teacher_cache_bytes
    from rnnify.convert import convert
    from rnnify.units import human_bytes

    student = convert(tiny_model("llama"), "lolcats", keep_attention="0")  # the kept layer's KV grows with length
    table = cache_table(student)
    for n in (4096, 32768):
        row = next(line for line in table.splitlines() if line.startswith(f"| {n:,} tokens"))
        assert human_bytes(cache_bytes(student, n)) in row and human_bytes(teacher_cache_bytes(student, n)) in row
    assert cache_bytes(student, 32768) > cache_bytes(student, 4096)


@pytest.mark.parametrize("argv,needle", [
    (["--context-length", "0"], "--context-length 0: context lengths [0]: accepted: token counts >= 2"),
    (["--passkey", "-5"], "--passkey [-5]: lengths [-5] are too short"),
    (["--text", "nope.txt"], "--text nope.txt: no such file"),
])
def test_eval_arguments(tiny_llama_dir, capsys, argv, needle):
    code, _, err = run(capsys, "eval", tiny_llama_dir, *argv)
    assert code == 2
    one_line(err, needle, "eval")


def test_cp_into_a_missing_folder(capsys, tmp_path):
    code, _, err = run(capsys, "cp", "quickstart", tmp_path / "no" / "x.yaml")
    assert code == 2
    one_line(err, "does not exist", "cp")
    assert run(capsys, "cp", "quickstart", tmp_path)[0] == 0 and (tmp_path / "quickstart.yaml").is_file()


def test_atomic_writes_replace_whole_files_with_the_usual_permissions(tmp_path):
    import os
    import stat

    from rnnify.io import write_json_atomic, write_text_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_text_atomic(tmp_path / "card.md", "first")
        write_text_atomic(tmp_path / "card.md", "second")
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "card.md").read_text() == "second"
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "card.md"]  # no temp file left behind


# ----------------------------------------------------------------------- bad input found by trying as a user
@pytest.fixture
def user_files(tiny_llama_dir, tmp_path, capsys):
    """A text to score, a retrofitted and a Mamba-in-the-Llama model, and a JSONL whose 'n' column holds numbers."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 100}" for j in range(50)) for i in range(100)) + "\n")
    assert run(capsys, "convert", tiny_llama_dir, "--method", "retrofit", "--prelude", "0", "--block", "1-2",
               "--coda", "3", "--out", tmp_path / "loop")[0] == 0
    assert run(capsys, "convert", tiny_llama_dir, "--method", "mamba_in_llama", "--out", tmp_path / "mil")[0] == 0
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": "w1 w2 w3 " * 8, "n": i}) + "\n"
                                                 for i in range(40)))
    return tmp_path


CASES = {  # command -> (argv after the command, one-line error it must end in)
    "budget-cache-no-percent": ("select-layers", ["{src}", "--method", "lolcats", "--budget-cache", "2", "--text",
                                                  "{d}/text.txt", "--tokens", "512"],
                                "--budget-cache '2': accepted: a share of the teacher's cache, P% or P%@L"),
    "budget-cache-at-0": ("select-layers", ["{src}", "--method", "lolcats", "--budget-cache", "10%@0"],
                          "--budget-cache '10%@0': the cache is measured at L tokens; accepted: L >= 1"),
    "keep-attention-at-0": ("convert", ["{src}", "--method", "lolcats", "--keep-attention", "auto:10%@0", "--out",
                                        "{d}/x"],
                            "keep-attention 'auto:10%@0': the cache is measured at L tokens; accepted: L >= 1"),
    "seq-len-over-tokens": ("select-layers", ["{src}", "--method", "lolcats", "--budget-layers", "2", "--text",
                                              "{d}/text.txt", "--tokens", "512", "--seq-len", "1024"],
                            "scoring on 512 tokens in sequences of 1024: accepted: a sequence length at most"),
    "huge-state-multiplier": ("convert", ["{d}/mil", "--method", "statex", "--state-multiplier", "1000000000",
                                          "--out", "{d}/x"],
                              "state_multiplier=1000000000 is not accepted; accepted: an integer >= 2 and <= 64"),
    "export-looped": ("export", ["{d}/loop", "--to", "bamba", "--out", "{d}/x"],
                      "cannot export to Bamba: a block of layers run 4 times with an input adapter"),
    "chat-without-template": ("generate", ["{d}/mil", "w1 w2", "--chat"],
                              "--chat: the tokenizer of {d}/mil has no chat template"),
    "validate-gpus-0": ("validate", ["{d}/r.yaml", "--gpus", "0"], "--gpus 0: accepted: a number of GPUs"),
    "text-field-not-text": ("run", ["{d}/r.yaml", "--no-progress"],
                            "text_field 'n' is a column of Value('int64'), not text; accepted: a text column (text)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_in_one_line_naming_it(user_files, tiny_llama_dir, capsys, case):
    import yaml

    d = user_files
    (d / "r.yaml").write_text(yaml.safe_dump({
        "name": "t", "model": {"source": str(tiny_llama_dir)}, "conversion": {"method": "supra"},
        "datasets": {"d": {"path": str(d / "rows.jsonl"), "text_field": "n"}},
        "stages": [{"type": "distill", "max_steps": 2, "seq_len": 16}], "output": {"dir": str(d / "rout")}}))
    command, argv, needle = CASES[case]
    fill = {"src": str(tiny_llama_dir), "d": str(d)}
    before = snapshot(d)
    code, _, err = run(capsys, command, *[a.format(**fill) for a in argv])
    assert code == 2
    one_line(err, needle.format(**fill), command)
    assert not (d / "x").exists() and not (d / "rout" / "model.safetensors").exists()
    assert {k: v for k, v in snapshot(d).items() if k in before} == before  # nothing there was changed


def test_push_of_a_truncated_model_stops_before_the_network(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import rnnify.hub

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    called = []
    monkeypatch.setattr(rnnify.hub, "HfApi", lambda *a, **k: called.append(a) or pytest.fail("network"))
    assert run(capsys, "convert", tiny_llama_dir, "--method", "supra", "--out", tmp_path / "m")[0] == 0
    _damage(tmp_path / "m" / "model.safetensors", "truncated")
    code, _, err = run(capsys, "push", tmp_path / "m", "user/x")
    assert code == 2 and not called
    one_line(err, f"weights file {tmp_path / 'm' / 'model.safetensors'} is damaged or truncated", "push")
