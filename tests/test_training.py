"""Training stages, checkpoints/resume, multi-process runs and data loading, on a tiny model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rnnify.distill import trainer
from rnnify.errors import RnnifyError
from rnnify.pipeline.runner import run_recipe
from rnnify.recipe import DataSpec, recipe_from_dict

from .conftest import make_tokenizer, tiny_model


def recipe(workdir, stages, method="lolcats", options=None, max_rows=None, **extra):
    options = options or ({"window": 8, "sinks": 2, "chunk_size": 16} if method == "lolcats" else {"chunk_size": 16})
    data = {
        "name": "tiny", "seed": 0,
        "model": {"source": str(workdir / "src")},
        "conversion": {"method": method, "options": options},
        "datasets": {"d": {"path": str(workdir / "data.txt"), "max_rows": max_rows}},
        "train": {"seq_len": 48, "batch_size": 4, "checkpoint_every": 2},
        "stages": stages,
        "output": {"dir": str(workdir / "out")},
        **extra,
    }
    return recipe_from_dict(data)


def losses(workdir, stage):
    rows = [json.loads(line) for line in (workdir / "out.run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["stage"] == stage], rows


@pytest.mark.parametrize(
    "stage,method",
    [({"type": "attention_transfer", "lr": 0.05}, "lolcats"), ({"type": "distill", "lr": 0.01}, "supra"),
     ({"type": "finetune", "lr": 0.003}, "supra"),
     ({"type": "finetune", "lr": 0.02, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}},
      "lolcats")],
    ids=["attention_transfer", "distill", "finetune", "finetune-lora"],
)
def test_each_stage_lowers_its_loss(workdir, stage, method):
    # linear branch at an even mix, so the tiny model's attention transfer has something to learn
    options = {"window": 8, "sinks": 2, "chunk_size": 16, "init_linear_mix_logit": 0.0} if method == "lolcats" else None
    # ~6 rows = 4 blocks = one batch: every step sees the same tokens, so the loss must fall
    r = recipe(workdir, [{**stage, "max_steps": 8, "schedule": "constant"}], method=method, options=options, max_rows=6)
    summary = run_recipe(r, progress=False)
    values, _ = losses(workdir, stage["type"])
    assert len(values) == 8 and summary["finished"]
    assert values[-1] < 0.9 * values[0], values
    assert (workdir / "out" / "model.safetensors").exists()


def test_distill_trains_only_new_parameters(workdir):
    r = recipe(workdir, [{"type": "distill", "max_steps": 2}], method="supra")
    run_recipe(r, progress=False)
    src = load_file(str(workdir / "src" / "model.safetensors"))
    out = load_file(str(workdir / "out" / "model.safetensors"))
    assert all(torch.equal(out[k], v) for k, v in src.items() if k in out)
    assert any("feature_map" in k for k in set(out) - set(src))


def test_lr_by_name_gives_matching_parameters_their_own_learning_rate(workdir):
    # Adam's first step moves every parameter with a gradient by about its lr (sign of the gradient, bias-corrected),
    # so after 2 constant-lr steps the mixing logits have moved ~2 x 0.5 and the feature maps ~2 x 1e-5
    r = recipe(workdir, [{"type": "distill", "max_steps": 2, "schedule": "constant", "lr": 1e-5, "grad_clip": None,
                          "lr_by_name": {"*linear_mix_logit": 0.5}}],
               options={"window": 8, "sinks": 2, "chunk_size": 16, "init_linear_mix_logit": 0.0})
    run_recipe(r, progress=False)
    out = _final_weights(workdir)
    mix = torch.cat([v.flatten() for k, v in out.items() if k.endswith("linear_mix_logit")])
    fmap = torch.cat([(v - torch.eye(v.shape[-1])).flatten() for k, v in out.items()
                      if k.endswith("feature_map_q.weight")])
    assert 0.5 < mix.abs().max() <= 1.0 + 1e-4, mix
    assert fmap.abs().max() <= 2e-5 + 1e-7, fmap.abs().max()
    with pytest.raises(RnnifyError, match=r"lr_by_name: \['\*nope'\] match no parameter"):
        run_recipe(recipe(workdir, [{"type": "distill", "max_steps": 1, "lr_by_name": {"*nope": 0.1}}],
                          output={"dir": str(workdir / "out2")}), progress=False)


def test_under_muon_lr_by_name_sets_the_muon_rate_of_the_matrices_it_matches(tiny_llama):
    """A glob's rate is Muon's for the hidden matrices it matches (a retrofit adapter that must grow fast) and
    AdamW's for the rest; every other matrix keeps muon_lr, every other parameter lr; a glob that matches nothing in
    either part is still an error."""
    from rnnify.convert import convert
    from rnnify.distill.settings import FinetuneSettings as TrainSettings

    student = convert(tiny_llama, "retrofit", options={"prelude": "0", "block": "1-2", "coda": "3",
                                                       "adapter_init": "passthrough", "state_init": "zeros"})
    student.requires_grad_(True)
    settings = TrainSettings(optimizer="muon", lr=1e-4, muon_lr=1e-3,
                             lr_by_name={"blocks.*.adapter.weight": 0.05, "*input_layernorm*": 0.02})
    opt = trainer.make_optimizer(student, settings)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert lr_of[id(named["blocks.0.adapter.weight"])] == 0.05
    assert lr_of[id(named["model.layers.1.self_attn.q_proj.weight"])] == 1e-3
    assert lr_of[id(named["model.layers.1.input_layernorm.weight"])] == 0.02
    assert lr_of[id(named["model.norm.weight"])] == 1e-4
    assert isinstance(opt.parts[0], torch.optim.Muon) and any(p is named["blocks.0.adapter.weight"]
                                                              for g in opt.parts[0].param_groups for p in g["params"])
    with pytest.raises(RnnifyError, match=r"lr_by_name: \['\*nope'\] match no parameter"):
        trainer.make_optimizer(student, TrainSettings(optimizer="muon", lr_by_name={"*nope": 0.1}))


def _final_weights(workdir):
    return load_file(str(workdir / "out" / "model.safetensors"))


def test_resume_after_interrupt_reaches_the_same_weights(workdir, monkeypatch):
    stages = [{"type": "attention_transfer", "max_steps": 4, "lr": 0.02}, {"type": "distill", "max_steps": 5, "lr": 0.01}]
    run_recipe(recipe(workdir, stages), progress=False)
    reference = _final_weights(workdir)
    shutil.rmtree(workdir / "out")
    shutil.rmtree(workdir / "out.run")

    def crash(stage, step):
        if stage == "distill" and step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_BEFORE_STEP", crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(workdir, stages), progress=False)
    assert not (workdir / "out").exists()  # nothing that looks finished
    state = json.loads((workdir / "out.run" / "state.json").read_text())
    assert state["completed"] == ["attention_transfer"]
    assert (workdir / "out.run" / "checkpoints" / "distill" / "step-0000003" / "meta.json").exists()

    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    summary = run_recipe(recipe(workdir, stages), resume=True, progress=False)
    assert list(summary["stages"]) == ["distill"]  # the finished stage was not redone
    resumed = _final_weights(workdir)
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-6, msg=k)


def test_streaming_data_resumes_to_the_same_weights(workdir, monkeypatch, tmp_path):
    """A streaming source is packed as training reaches it; an interrupted run leaves a partial token cache that the
    resumed run extends, and the resumed run sees the batches the uninterrupted one saw."""
    stages = [{"type": "distill", "max_steps": 6, "lr": 0.01, "batch_size": 2}]

    def streaming_recipe():
        r = recipe(workdir, stages, method="supra")
        r.datasets["d"].streaming = True
        return r

    monkeypatch.setenv("RNNIFY_TOKEN_CACHE", str(tmp_path / "cache-a"))
    run_recipe(streaming_recipe(), progress=False)
    reference = _final_weights(workdir)
    shutil.rmtree(workdir / "out")
    shutil.rmtree(workdir / "out.run")

    monkeypatch.setenv("RNNIFY_TOKEN_CACHE", str(tmp_path / "cache-b"))
    monkeypatch.setattr(trainer, "_BEFORE_STEP", lambda stage, step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 3 else None)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(streaming_recipe(), progress=False)
    (progress,) = [json.loads(p.read_text()) for p in (tmp_path / "cache-b").glob("*/progress.json")]
    assert not progress["complete"] and progress["rows"] < 300  # only the rows training reached were read
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    run_recipe(streaming_recipe(), resume=True, progress=False)
    resumed = _final_weights(workdir)
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-6, msg=k)


def test_only_stage_starts_from_the_previous_stage(workdir):
    stages = [{"type": "attention_transfer", "max_steps": 2}, {"type": "distill", "max_steps": 2}]
    s1 = run_recipe(recipe(workdir, stages), only_stage="attention_transfer", progress=False)
    assert not s1["finished"] and not (workdir / "out").exists()
    s2 = run_recipe(recipe(workdir, stages), only_stage="distill", progress=False)
    assert s2["finished"] and (workdir / "out" / "model.safetensors").exists()
    with pytest.raises(RnnifyError, match="its stages: attention_transfer, distill"):
        run_recipe(recipe(workdir, stages), only_stage="nope", progress=False)


def test_nan_loss_stops_with_the_step_and_stage(workdir):
    r = recipe(workdir, [{"type": "finetune", "max_steps": 6, "lr": 1e30, "grad_clip": None}], method="supra")
    with pytest.raises(RnnifyError, match=r"stage finetune: loss is (nan|inf) at step \d"):
        run_recipe(r, progress=False)


def test_existing_output_is_not_overwritten(workdir):
    (workdir / "out").mkdir()
    (workdir / "out" / "config.json").write_text("{}")
    with pytest.raises(RnnifyError, match="already holds a model"):
        run_recipe(recipe(workdir, [{"type": "distill", "max_steps": 1}]), progress=False)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_two_process_run_matches_single_process(workdir, tmp_path):
    stages = [{"type": "distill", "max_steps": 4, "lr": 0.01}]
    single = recipe(workdir, stages, method="supra")
    run_recipe(single, progress=False)
    single_losses, _ = losses(workdir, "distill")

    data = yaml.safe_load((workdir / "out.run" / "recipe.yaml").read_text())
    data["output"] = {"dir": str(workdir / "out2")}
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "rnnify", "run", str(tmp_path / "r2.yaml"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "out2.run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["world_size"] == 2 for row in rows)
    assert all(len(row["rank_tokens"]) == 2 and min(row["rank_tokens"]) > 0 for row in rows)
    multi_losses = [row["loss"] for row in rows]
    assert len(multi_losses) == len(single_losses) == 4
    for a, b in zip(single_losses, multi_losses):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (single_losses, multi_losses)


# ------------------------------------------------------------------------------------------ data loading
def test_jsonl_parquet_and_chat_data(tmp_path):
    import datasets

    from rnnify.distill.data import pack_tokens

    tok = make_tokenizer(128)
    rows = [{"text": " ".join(f"w{j % 50}" for j in range(i, i + 30))} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    a = pack_tokens(DataSpec(path=str(tmp_path / "d.jsonl")), tok, 16)
    b = pack_tokens(DataSpec(path=str(tmp_path / "d.parquet")), tok, 16)
    assert a.shape == b.shape and torch.equal(a, b) and a.shape[1] == 16
    t = pack_tokens(DataSpec(path=str(tmp_path / "d.jsonl"), template="{text}"), tok, 16)
    assert torch.equal(t, a)
    # 20 rows x (30 words + EOS) = 620 tokens -> 38 blocks of 16
    assert a.shape[0] == 620 // 16
    assert a[0, :3].tolist() == tok("w0 w1 w2", add_special_tokens=False)["input_ids"]

    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    chats = [{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}] * 10
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    c = pack_tokens(DataSpec(path=str(tmp_path / "c.jsonl"), messages_field="messages"), tok, 8)
    assert c[0].tolist()[:4] == tok("<s> w1 w2 </s>", add_special_tokens=False)["input_ids"]

    with pytest.raises(RnnifyError, match="no column 'body'; columns: text"):
        pack_tokens(DataSpec(path=str(tmp_path / "d.jsonl"), text_field="body"), tok, 16)
    with pytest.raises(RnnifyError, match="does not exist"):
        pack_tokens(DataSpec(path=str(tmp_path / "missing.txt")), tok, 16)
    with pytest.raises(RnnifyError, match="fewer than 4096 tokens"):
        pack_tokens(DataSpec(path=str(tmp_path / "d.jsonl")), tok, 4096)


def test_batches_are_deterministic_and_cover_the_data():
    from rnnify.distill.settings import StageSettings

    s = StageSettings(batch_size=4, grad_accum=2, max_steps=10)
    seen = torch.cat([trainer.batch_indices(10, 3, step, m, s) for step in range(5) for m in range(2)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # the first epoch is a permutation
    assert torch.equal(trainer.batch_indices(10, 3, 2, 1, s), trainer.batch_indices(10, 3, 2, 1, s))


def test_lora_adapters_train_with_extra_patterns():
    from rnnify.convert import convert
    from rnnify.distill.settings import LoraSpec
    from rnnify.distill.stages import select_trainable
    from rnnify.pipeline.student import apply_lora

    student = convert(tiny_model("llama"), "lolcats")
    model = apply_lora(student, LoraSpec(r=4))
    names = select_trainable(model, ["@new"], student.new_parameter_names(), keep_existing=True)
    assert sum("lora_" in n for n in names) == 32  # q/k/v/o x A/B x 4 layers
    assert sum("feature_map" in n for n in names) == 16
    assert not any("mlp" in n for n in names)


# ------------------------------------------------------------------------------------------ FSDP (2 processes, gloo)
def _launch(cmd_tail, recipe_path, env_extra=None, resume=False):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", *cmd_tail, "-m", "rnnify", "run", str(recipe_path), "--no-progress"]
    return subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, env=env, timeout=600)


def _torchrun(port):
    return ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_fsdp_checkpoints_hold_full_tensors_and_resume_matches(workdir, tmp_path):
    """FSDP2 on CPU (gloo): the losses match one process; an interrupted run's checkpoint holds whole tensors (the
    shapes of the unsharded model, not halves) and the optimizer state by name; resuming it ends at the weights of
    the uninterrupted sharded run. Stage settings cover gradient accumulation (gradient sync skipped on micro-steps)
    and gradient checkpointing."""
    stages = [{"type": "distill", "max_steps": 4, "lr": 0.01, "grad_accum": 2, "gradient_checkpointing": True}]
    run_recipe(recipe(workdir, stages, method="supra"), progress=False)
    single_losses, _ = losses(workdir, "distill")
    single = load_file(str(workdir / "out.run" / "stages" / "distill" / "model.safetensors"))

    base = yaml.safe_load((workdir / "out.run" / "recipe.yaml").read_text())
    base["distributed"] = {"strategy": "fsdp"}
    paths = {}
    for name in ("whole", "cut"):
        data = {**base, "output": {"dir": str(workdir / name)}}
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(data))
    r = _launch(_torchrun(29531), paths["whole"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "whole.run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["world_size"] for row in rows] == [2] * 4
    for a, b in zip(single_losses, [row["loss"] for row in rows]):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(a)), (single_losses, rows)

    r = _launch(_torchrun(29532), paths["cut"], {"RNNIFY_FAULT_INTERRUPT_AT_STEP": "3"})
    assert r.returncode != 0 and "interrupted; checkpoint at step 3" in r.stdout + r.stderr, r.stderr[-3000:]
    ckpt = workdir / "cut.run" / "checkpoints" / "distill" / "step-0000003"
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert saved and all(tuple(v.shape) == tuple(single[k].shape) for k, v in saved.items())
    optim = torch.load(ckpt / "optim.pt", weights_only=False)
    assert set(optim["optimizer_fqn"]["state"]) == set(saved)
    assert json.loads((ckpt / "meta.json").read_text())["sharding"] == "fsdp"

    r = _launch(_torchrun(29533), paths["cut"], resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = load_file(str(workdir / "whole.run" / "stages" / "distill" / "model.safetensors"))
    resumed = load_file(str(workdir / "cut.run" / "stages" / "distill" / "model.safetensors"))
    assert set(whole) == set(resumed) == set(single)
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(whole[k], single[k], rtol=1e-3, atol=1e-4, msg=k)
    assert (workdir / "cut" / "model.safetensors").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="accelerate launch with gloo")
def test_shipped_accelerate_fsdp_config_runs_every_stage_kind(workdir, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml` on CPU: the recipe does not ask for FSDP, the
    launch config does. Attention transfer (mixers called directly, in blocks rebuilt in the backward pass),
    stepwise distillation in bf16 (teacher attentions inside the student; the loss over chunks of positions) and a
    LoRA fine-tune all train sharded, and the saved model loads."""
    from rnnify.paths import RECIPES_DIR

    stages = [{"type": "attention_transfer", "max_steps": 2, "lr": 0.05, "layers_per_block": 2},
              {"type": "distill", "max_steps": 2, "dtype": "bfloat16", "active_layers": [0]},
              {"type": "finetune", "max_steps": 2, "lora": {"r": 4}}]
    r = recipe(workdir, stages, options={"window": 8, "sinks": 2, "chunk_size": 16, "init_linear_mix_logit": 0.0})
    from rnnify.recipe import dump_recipe

    (tmp_path / "r.yaml").write_text(dump_recipe(r))
    cmd = ["accelerate.commands.launch", "--config_file", str(RECIPES_DIR / "accelerate" / "fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", "29541"]
    out = _launch(cmd, tmp_path / "r.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    for stage in ("attention_transfer", "distill", "finetune"):
        assert f"[{stage}] FSDP2 over 2 processes" in log, log[-3000:]
    rows = [json.loads(x) for x in (workdir / "out.run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in rows] == ["attention_transfer"] * 2 + ["distill"] * 2 + ["finetune"] * 2
    assert all(0 < row["loss"] < 100 for row in rows), rows
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "out", trust_remote_code=True)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_gradient_checkpointing_changes_memory_not_results(workdir):
    """Recomputing activations in the backward pass gives the same losses and weights as keeping them."""
    stage = {"type": "distill", "max_steps": 3, "lr": 0.01}
    runs = []
    for gc_on in (False, True):
        shutil.rmtree(workdir / "out", ignore_errors=True), shutil.rmtree(workdir / "out.run", ignore_errors=True)
        run_recipe(recipe(workdir, [{**stage, "gradient_checkpointing": gc_on}], method="supra"), progress=False)
        runs.append((losses(workdir, "distill")[0], load_file(str(workdir / "out" / "model.safetensors"))))
    (l0, w0), (l1, w1) = runs
    assert l0 == pytest.approx(l1, rel=1e-5)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-5, atol=1e-6)


def _select_recipe(workdir, stages, **conversion):
    return recipe(workdir, stages, method="supra", conversion={
        "method": "supra", "options": {"chunk_size": 16}, "keep_attention": "auto:1",
        "select_after": "attention_transfer", "select_text": str(workdir / "data.txt"), **conversion})


def test_select_after_scores_the_trained_model_and_keeps_its_weights(workdir):
    """select_after: the layers are scored on the model the stage trained (checked against score_layers on the same
    training run saved without selection), the chosen one returns to the teacher's attention, and every other
    trained weight carries over into the hybrid."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rnnify.convert.layer_select import score_layers, text_ids

    at = [{"type": "attention_transfer", "max_steps": 3, "lr": 0.05}]
    run_recipe(recipe(workdir, at, method="supra"), progress=False)  # the same training, every layer converted
    trained = AutoModelForCausalLM.from_pretrained(workdir / "out", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(workdir / "src", dtype=torch.float32)
    ids = text_ids(AutoTokenizer.from_pretrained(workdir / "src"), str(workdir / "data.txt"))
    expected = score_layers(teacher, trained.eval(), ids, "restore")
    shutil.rmtree(workdir / "out"), shutil.rmtree(workdir / "out.run")

    run_recipe(_select_recipe(workdir, at + [{"type": "distill", "max_steps": 2, "lr": 0.01}]), progress=False)
    info = json.loads((workdir / "out.run" / "state.json").read_text())["stages"]["attention_transfer"]
    assert info["layer_scores"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    keep = [max(range(4), key=lambda i: expected[i])]
    assert info["selected_layers"] == keep
    hybrid = load_file(str(workdir / "out.run" / "stages" / "attention_transfer" / "model.safetensors"))
    before = {k: v for k, v in trained.state_dict().items() if not k.startswith(f"model.layers.{keep[0]}.self_attn.")}
    assert set(before) - set(hybrid) == {"model.embed_tokens.weight"}  # tied to lm_head: saved once
    for k in set(before) & set(hybrid):
        torch.testing.assert_close(hybrid[k], before[k], msg=k)  # the trained mixers and the shared weights carried over
    for name in ("q_proj", "o_proj"):  # the kept layer is the teacher's attention again
        torch.testing.assert_close(hybrid[f"model.layers.{keep[0]}.self_attn.{name}.weight"],
                                   teacher.state_dict()[f"model.layers.{keep[0]}.self_attn.{name}.weight"])
    final = AutoModelForCausalLM.from_pretrained(workdir / "out")
    assert [i for i, _ in final.mixers()] == [i for i in range(4) if i not in keep]


def test_select_after_resumes_the_chosen_hybrid(workdir, monkeypatch):
    stages = [{"type": "attention_transfer", "max_steps": 3, "lr": 0.05}, {"type": "distill", "max_steps": 4, "lr": 0.01}]
    run_recipe(_select_recipe(workdir, stages), progress=False)
    reference = _final_weights(workdir)
    shutil.rmtree(workdir / "out"), shutil.rmtree(workdir / "out.run")
    monkeypatch.setattr(trainer, "_BEFORE_STEP", lambda stage, step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if stage == "distill" and step == 3 else None)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_select_recipe(workdir, stages), progress=False)
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    run_recipe(_select_recipe(workdir, stages), resume=True, progress=False)
    resumed = _final_weights(workdir)
    assert resumed.keys() == reference.keys()  # the same layers kept as attention
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.parametrize("conversion,stage,message", [
    ({"keep_attention": [1]}, {}, "keep_attention must then be auto:N"),
    ({"select_after": "warmup"}, {}, "'warmup' is not a stage of this recipe; its stages: attention_transfer"),
    ({"select_after": "finetune"}, {"type": "finetune", "lora": {"r": 2, "merge": False}},
     r"stage 'finetune' is conversion.select_after: its LoRA adapters must be merged \(lora.merge: true\)"),
])
def test_select_after_errors_name_what_is_accepted(workdir, conversion, stage, message):
    with pytest.raises(RnnifyError, match=message):
        _select_recipe(workdir, [{"type": "attention_transfer", "max_steps": 1, **stage}], **conversion)
