"""The memory plan (rnnify validate --plan): its arithmetic against the bytes a real training step holds, its CLI,
and the warning a run gives before any weights load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tr
import yaml

from rnnify.cli import main
from rnnify.distill.stages import STAGES, build_objective
from rnnify.errors import RnnifyError
from rnnify.pipeline import runner
from rnnify.pipeline.memory_plan import SavedTensors, plan_recipe, trace_activations
from rnnify.recipe import recipe_from_dict
from rnnify.units import parse_bytes

from .conftest import make_tokenizer


def _source(tmp_path, hidden=64, layers=2, vocab=128):
    cfg = tr.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512)
    torch.manual_seed(0)
    tr.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    make_tokenizer(vocab).save_pretrained(tmp_path / "src")
    (tmp_path / "data.txt").write_text("\n".join(f"w{i % 17} w{i % 5} w{i % 11}" for i in range(2000)))
    return tmp_path / "src"


def _recipe(tmp_path, stage, method="supra", seq_len=32, batch=2):
    return recipe_from_dict({
        "model": {"source": str(tmp_path / "src")}, "conversion": {"method": method},
        "datasets": {"d": {"path": str(tmp_path / "data.txt")}},
        "stages": [{**stage, "max_steps": 1, "seq_len": seq_len, "batch_size": batch}],
        "output": {"dir": str(tmp_path / "out")}})


@pytest.mark.parametrize("stage", [{"type": "finetune", "trainable": ["*"]}, {"type": "distill"}],
                         ids=["finetune-all", "distill-new"])
def test_plan_arithmetic_matches_the_bytes_of_a_real_step(tmp_path, stage):
    """Weights, gradients and AdamW state: the plan's bytes equal those a real step holds on CPU; activations: the
    trace on meta tensors gives the bytes the same trace gives on the real model."""
    _source(tmp_path)
    recipe = _recipe(tmp_path, stage)
    plan = plan_recipe(recipe, devices=1, cuda=False).stages[0]

    from rnnify import sources
    from rnnify.distill.trainer import make_optimizer
    from rnnify.pipeline.student import recipe_student, stage_model

    teacher, _ = sources.load_source(str(tmp_path / "src"), progress=lambda *_: None)
    student = recipe_student(recipe, teacher)
    settings = recipe.stage_settings(0)
    spec = STAGES[stage["type"]]
    model, trainable, active = stage_model(student, settings, spec, student.new_parameter_names())
    objective = build_objective(stage["type"], model, teacher if spec.needs_teacher else None, settings, active)
    real_act = trace_activations(objective, 2, 32, device="cpu")

    optimizer = make_optimizer(model, settings)
    loss, _ = objective(torch.randint(0, 128, (2, 32)))
    loss.backward()
    optimizer.step()
    params = [p for p in model.parameters()]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert plan.parts["student weights"] == nbytes(params)
    assert plan.parts["gradients"] == nbytes(p.grad for p in params if p.grad is not None) > 0
    states = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    assert plan.parts["optimizer (adamw)"] == nbytes(states)
    if spec.needs_teacher:
        assert plan.parts["teacher weights"] == nbytes(teacher.parameters())
    assert plan.trainable_params == sum(p.numel() for p in params if p.requires_grad)
    # meta and real differ only by small data-dependent tensors (e.g. nonzero() on meta assumes every element)
    assert plan.activations == pytest.approx(real_act[0], rel=0.1)
    assert plan.activations_checkpointed == pytest.approx(real_act[1], rel=0.1)
    assert 0 < plan.activations_checkpointed < plan.activations


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_saved_tensors_count_only_graphs_still_held():
    """A graph freed during the trace (a logits chunk's loss taken inside the forward) gives its saved bytes back:
    keyed by storage address, a freed storage's entry would otherwise stay, and a later storage at that address
    would be taken for it or not by chance (the planned activations varied by ~8% from one trace to the next)."""
    x = torch.randn(1000, requires_grad=True)  # not a Parameter: what its ops save is counted
    rec = SavedTensors()
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        y = (x * 3).sin()  # sin saves its input, x * 3: 4000 bytes
        assert rec.total() == 4000
        del y  # the graph, and the tensor it saved, are gone
        assert rec.total() == 0 and rec.by_layer() == {}
        z = x.exp()  # exp saves its output
        assert rec.total() == 4000
    z.sum().backward()
    assert torch.allclose(x.grad, x.exp())


def test_planned_activations_against_measured_memory(tmp_path):
    """In a fresh process (glibc's mmap threshold fixed, so freed tensors leave the resident set) the anonymous
    resident set grows by the activations of a forward + backward: the plan is within 25% of that."""
    _source(tmp_path, hidden=256, layers=4, vocab=8192)
    recipe = _recipe(tmp_path, {"type": "finetune", "trainable": ["*"]}, seq_len=256, batch=8)
    plan = plan_recipe(recipe, devices=1, cuda=False).stages[0]
    script = textwrap.dedent(f"""
        import json, threading, torch
        from rnnify.recipe import load_recipe
        from rnnify.pipeline.student import recipe_student, stage_model
        from rnnify.distill.stages import STAGES, build_objective
        from rnnify import sources
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        recipe = load_recipe({str(tmp_path / 'r.yaml')!r}, [])
        teacher, _ = sources.load_source({str(tmp_path / 'src')!r}, progress=lambda *_: None)
        student = recipe_student(recipe, teacher)
        del teacher
        s = recipe.stage_settings(0)
        model, _, active = stage_model(student, s, STAGES["finetune"], student.new_parameter_names())
        obj = build_objective("finetune", model, None, s, active)
        for p in model.parameters():  # gradients allocated up front: the growth below is activations only
            p.grad = torch.zeros_like(p)
        ids = torch.randint(0, 8192, (8, 256))
        base = peak = rss()
        stop = threading.Event()
        def sample():
            global peak
            while not stop.wait(0.002):
                peak = max(peak, rss())
        t = threading.Thread(target=sample); t.start()
        loss, _ = obj(ids)
        loss.backward()
        stop.set(); t.join()
        print(json.dumps({{"measured": max(peak, rss()) - base}}))
    """)
    from rnnify.recipe import dump_recipe

    (tmp_path / "r.yaml").write_text(dump_recipe(recipe))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    measured = json.loads(r.stdout.strip().splitlines()[-1])["measured"]
    assert measured > 50 * 2**20  # large enough to be measured at all
    assert 0.75 * measured <= plan.activations <= 1.25 * measured, (plan.activations / 2**20, measured / 2**20)


def test_fsdp_divides_what_is_sharded(tmp_path):
    _source(tmp_path)
    recipe = _recipe(tmp_path, {"type": "distill"}, batch=8)
    one = plan_recipe(recipe, devices=1, cuda=False).stages[0]
    ddp = plan_recipe(recipe, devices=4, strategy="ddp", cuda=False).stages[0]
    fsdp = plan_recipe(recipe, devices=4, strategy="fsdp", cuda=False).stages[0]
    assert ddp.parts["student weights"] == one.parts["student weights"]
    assert fsdp.parts["student weights"] == pytest.approx(one.parts["student weights"] / 4)
    assert fsdp.parts["optimizer (adamw)"] == pytest.approx(one.parts["optimizer (adamw)"] / 4)
    assert fsdp.parts["teacher weights"] < one.parts["teacher weights"]
    assert ddp.micro_batch == fsdp.micro_batch == 2 and ddp.activations < one.activations


def test_validate_plan_cli_from_a_config_alone(tmp_path, capsys):
    """--source takes a folder holding only config.json (a 'Llama-sized' check needs no weights); a plan that does
    not fit says so with advice; a bad memory size is one clear error."""
    _source(tmp_path)
    recipe = _recipe(tmp_path, {"type": "finetune", "trainable": ["*"]})
    from rnnify.recipe import dump_recipe

    (tmp_path / "r.yaml").write_text(dump_recipe(recipe))
    big = tmp_path / "big"
    big.mkdir()
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg.update(hidden_size=512, intermediate_size=1024, num_hidden_layers=6)
    (big / "config.json").write_text(json.dumps(cfg))
    assert main(["validate", str(tmp_path / "r.yaml"), "--plan", "--gpus", "2", "--gpu-memory", "80GiB",
                 "--source", str(big)]) == 0
    out = capsys.readouterr().out
    assert "memory plan for" in out and "on 2 device(s) of 80.00 GiB" in out and "fits" in out
    assert main(["validate", str(tmp_path / "r.yaml"), "--plan", "--gpu-memory", "1MB", "--source", str(big)]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "-> " in out
    assert main(["validate", str(tmp_path / "r.yaml"), "--plan", "--gpu-memory", "eighty"]) != 0
    assert "--gpu-memory 'eighty' is not a size; accepted: a number and a unit" in capsys.readouterr().err


def test_parse_bytes():
    # GB/MB are powers of 1000 (as transformers reads max_shard_size), GiB/MiB of 1024: one parser for both flags
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1.5TB") == 1.5e12 and parse_bytes("5gb") == 5 * 10**9
    assert parse_bytes(1000, bare_bytes=True) == 1000 and parse_bytes("1000", bare_bytes=True) == 1000
    for bad in ("80", "1.5T", "0GB", "-1GB"):
        with pytest.raises(RnnifyError, match="size|above zero"):
            parse_bytes(bad)
    with pytest.raises(RnnifyError, match="'lots' is not a size; accepted: a number and a unit"):
        parse_bytes("lots")


def test_run_warns_before_weights_load_when_the_plan_does_not_fit(tmp_path, monkeypatch, capsys):
    _source(tmp_path)
    recipe = _recipe(tmp_path, {"type": "distill"})
    monkeypatch.setattr(runner, "device_memory", lambda device, processes: 2**20)
    order = []
    load = runner.sources.load_source
    monkeypatch.setattr(runner.sources, "load_source", lambda *a, **k: (order.append("load"), load(*a, **k))[1])
    real_check = runner.check_device_memory
    monkeypatch.setattr(runner, "check_device_memory", lambda *a, **k: (order.append("plan"), real_check(*a, **k))[1])
    runner.run_recipe(recipe, progress=False)
    err = capsys.readouterr().err
    assert "warning: by its memory plan this run needs" in err and "1.00 MiB" in err and "DOES NOT FIT" in err
    assert order[:2] == ["plan", "load"]


def test_every_shipped_recipe_with_a_local_source_has_a_plan():
    from rnnify.paths import RECIPES_DIR
    from rnnify.recipe import load_recipe

    planned = 0
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data["model"]["source"] != "smollm2-135m" or data["conversion"].get("start_from"):
            continue  # a Hub model or another recipe's output: not here offline
        plan = plan_recipe(load_recipe(str(path), []), devices=8, device_memory=parse_bytes("80GiB"))
        assert all(s.total > 0 and s.activations > 0 for s in plan.stages), path
        planned += 1
    assert planned >= 5


def test_block_wise_transfer_and_chunked_logits_lower_the_plan_and_are_advised(tmp_path):
    """Fewer layers per block and the loss over chunks of positions lower the planned activations; a stage that does
    not fit is told the setting (traced, with its total)."""
    _source(tmp_path, layers=4, vocab=4096)  # a vocabulary large beside the model, as real ones are

    def stage_plan(stage, memory=None, seq_len=512):
        return plan_recipe(_recipe(tmp_path, stage, method="lolcats", seq_len=seq_len), devices=1, cuda=False,
                           device_memory=memory)

    at_all, at_one = (stage_plan({"type": "attention_transfer", "layers_per_block": k}, seq_len=64).stages[0]
                      for k in (None, 1))
    assert at_one.activations < 0.8 * at_all.activations
    whole, chunked = (stage_plan({"type": "distill", "logits_chunk": c}).stages[0] for c in (None, 128))
    assert chunked.activations < 0.75 * whole.activations

    tight = whole.total - (whole.activations - chunked.activations) // 2  # fits with chunks, not without
    plan = stage_plan({"type": "distill", "logits_chunk": None}, memory=tight)
    assert not plan.fits() and any(a.startswith("logits_chunk: 128 in stage distill (the same losses, less memory)")
                                   and a.endswith("(fits)") for a in plan.advice["distill"])
    plan = stage_plan({"type": "attention_transfer"}, memory=at_one.total + 1, seq_len=64)
    assert any(a.startswith("layers_per_block: ") for a in plan.advice["attention_transfer"])


def test_the_70b_recipe_fits_eight_80gb_gpus_at_every_stage():
    """recipes/lolcats_70b.yaml planned from Llama-3-70B's shape alone (benchmarks/configs): every stage fits 8 x 80 GB
    under FSDP, where the attention transfer of lolcats.yaml with every layer at once does not."""
    from rnnify.paths import PACKAGE_DIR, RECIPES_DIR
    from rnnify.recipe import load_recipe

    shape = str(PACKAGE_DIR.parent / "benchmarks" / "configs" / "llama-3-70b")
    plan = plan_recipe(load_recipe(str(RECIPES_DIR / "lolcats_70b.yaml"), []), devices=8,
                       device_memory=parse_bytes("80GB"), source=shape)
    assert plan.teacher_params > 70e9 and len(plan.stages) == 2 and plan.fits(), plan.report()
