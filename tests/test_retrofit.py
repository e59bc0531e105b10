"""Retrofitted depth recurrence: surgery equivalences, the loop sampler and curriculum, truncated backprop, generation
at a chosen loop count, Muon, the CLI. (Decode == parallel, padding, bf16, save/load with and without rnnify and cache
bytes are in the method matrix.)"""

import json
import math

import pytest
import torch

from rnnify.cli import main
from rnnify.convert import convert
from rnnify.distill.recurrence import mean_at, sample_loops
from rnnify.distill.settings import RecurrenceSpec
from rnnify.errors import RnnifyError

from .conftest import tiny_model
from .test_program import truncated_source

PASS = {"adapter_init": "passthrough", "state_init": "zeros"}


@pytest.mark.parametrize("fam", ["llama", "qwen2", "gemma3_text"])
def test_no_block_is_the_source_bit_exactly(fam):
    teacher = tiny_model(fam)
    student = convert(teacher, "retrofit", options={"block": "none"})
    assert student.config.layer_mixers == ["attention"] * 4 and not len(student.blocks)
    x = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


def test_one_passthrough_loop_is_the_source_without_the_dropped_layers():
    teacher = tiny_model("llama")
    student = convert(teacher, "retrofit", options={"prelude": "0", "block": "2", "coda": "3", "recurrence": 1, **PASS})
    assert student.config.layer_mixers == ["attention", "dropped", "attention", "attention"]
    x = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert torch.equal(student(x).logits, truncated_source(teacher, [0, 2, 3])(x).logits)


def test_default_split_follows_the_papers_rule():
    from rnnify.convert.retrofit import default_split

    assert default_split(22) == ([0, 1, 2, 3], list(range(10, 18)), [18, 19, 20, 21])  # TinyLlama: 4 / 8 / 4
    pre, block, coda = default_split(16)  # Llama-3.2-1B: (4, 6, 4)
    assert (len(pre), len(block), len(coda)) == (4, 6, 4) and block[-1] + 1 == coda[0]
    pre, block, coda = default_split(30)  # SmolLM2-135M
    assert pre == [0, 1, 2, 3] and coda == [26, 27, 28, 29] and block == list(range(15, 26))


@pytest.mark.parametrize("mean,sigma", [(4.0, 0.5), (8.0, 0.5), (2.5, 0.2)])
def test_loop_sampler_matches_the_poisson_lognormal(mean, sigma):
    spec = RecurrenceSpec(mean=mean, sigma=sigma)
    draws = torch.tensor([sample_loops(spec, mean, seed=3, step=s) for s in range(20000)], dtype=torch.float64)
    mu = mean - 1
    want_var = mu + mu**2 * (math.exp(sigma**2) - 1)  # Poisson-LogNormal: E[rate] + Var[rate]
    assert abs(draws.mean().item() - mean) < 0.05 * mean
    assert abs(draws.var().item() - want_var) < 0.1 * want_var
    assert draws.min() >= 1
    # the same (seed, step) gives the same count on every process
    assert all(sample_loops(spec, mean, 3, s) == sample_loops(spec, mean, 3, s) for s in range(50))
    assert sample_loops(spec, 1.0, 3, 0) == 1
    capped = RecurrenceSpec(mean=mean, sigma=sigma, max_loops=3)
    assert max(sample_loops(capped, mean, 1, s) for s in range(500)) == 3


def test_curriculum_ramps_the_mean():
    lin = RecurrenceSpec(mean=9, ramp=0.5)
    assert mean_at(lin, 0, 100) == 1 and mean_at(lin, 25, 100) == pytest.approx(5) and mean_at(lin, 50, 100) == 9
    assert mean_at(lin, 99, 100) == 9
    sq = RecurrenceSpec(mean=9, ramp=0.5, ramp_shape="1-sqrt")
    assert mean_at(sq, 25, 100) == pytest.approx(1 + 8 * (1 - math.sqrt(0.5)))
    assert mean_at(RecurrenceSpec(mean=6), 0, 100) == 6  # no ramp


def test_truncated_backprop_runs_the_early_loops_without_a_graph():
    student = convert(tiny_model("llama"), "retrofit", options={"prelude": "0", "block": "1-2", "coda": "3"}).train()
    seen = []
    hook = student.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(torch.is_grad_enabled()))
    x = torch.randint(0, 128, (2, 10))
    student(x, labels=x, recurrence=5, backprop_loops=2).loss.backward()
    hook.remove()
    assert seen == [False, False, False, True, True]
    # the adapter is shared by all loops: only the last two contribute gradient
    g2 = student.blocks[0].adapter.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    student(x, labels=x, recurrence=5, backprop_loops=5).loss.backward()
    assert not torch.allclose(g2, student.blocks[0].adapter.weight.grad)


def test_generate_at_a_chosen_loop_count_equals_recomputing():
    student = convert(tiny_model("llama"), "retrofit", options={"prelude": "0", "block": "1-2", "coda": "3",
                                                                "state_init": "zeros", "recurrence": 2})
    x = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        for r in (1, 3):
            out = student.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=7, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True, pad_token_id=0, recurrence=r)
            full = student(out.sequences, recurrence=r).logits
            torch.testing.assert_close(torch.stack(out.scores, 1), full[:, 5:-1], atol=1e-4, rtol=1e-4)


def test_untied_embeddings_get_their_own_head():
    teacher = tiny_model("llama")
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    student = convert(teacher, "retrofit", options={"untie_embeddings": True, "prelude": "0", "block": "1-2",
                                                    "coda": "3"})
    assert not student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, student.model.embed_tokens.weight)


@pytest.mark.parametrize("flags,needle", [
    (["--prelude", "0-1", "--block", "1-2"], "layer 1 is in both --prelude and --block"),
    (["--block", "2-5"], "layer 4 is out of range; this model has layers 0..3"),
    (["--prelude", "2", "--block", "0-1", "--coda", "3"], "in order prelude < block < coda"),
    (["--recurrence", "0"], "recurrence=0 is not accepted; accepted: an integer >= 1"),
    (["--adapter-init", "eye"], "adapter_init='eye' is not accepted; accepted: random, passthrough"),
])
def test_bad_splits_are_one_line_errors(tiny_llama_dir, tmp_path, capsys, flags, needle):
    assert main(["convert", str(tiny_llama_dir), "--method", "retrofit", *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_inspect_generate_and_eval_at_several_depths(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "loop"
    assert main(["convert", str(tiny_llama_dir), "--method", "retrofit", "--prelude", "0", "--block", "2",
                 "--coda", "3", "--adapter-init", "passthrough", "--state-init", "zeros", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "block    layers 2-2 x 4 loops" in shown and "dropped  1" in shown and "FLOPs per token" in shown
    assert main(["generate", str(out), "w1 w2 w3", "--max-new-tokens", "3", "--recurrence", "8"]) == 0
    assert main(["generate", str(out), "w1", "--recurrence", "0"]) == 2
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(600)))
    capsys.readouterr()
    assert main(["eval", str(out), "--teacher", str(tiny_llama_dir), "--text", str(text), "--context", "64",
                 "--num-windows", "2", "--passkey", "--speed", "--recurrence", "1,2,4"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["recurrence"]) == {"1", "2", "4"}
    flops = [res["recurrence"][r]["flops_per_token"] for r in ("1", "2", "4")]
    assert flops[0] < flops[1] < flops[2]
    png = (out / "recurrence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "recurrence.png" in (out / "README.md").read_text()
    assert main(["eval", str(tiny_llama_dir), "--text", str(text), "--context", "64", "--num-windows", "1",
                 "--passkey", "--speed", "--recurrence", "2"]) == 2


def test_a_recurrence_stage_with_muon_trains_and_resumes(tmp_path):
    import random

    from rnnify.distill import trainer
    from rnnify.pipeline.runner import run_recipe
    from rnnify.recipe import recipe_from_dict

    from .conftest import make_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "src")
    make_tokenizer(128).save_pretrained(tmp_path / "src")
    rng = random.Random(0)
    (tmp_path / "d.txt").write_text("\n".join(" ".join(f"w{(i * 7 + j) % 23}" for j in range(rng.randint(20, 40)))
                                              for i in range(200)))

    def recipe(out):
        return recipe_from_dict({
            "model": {"source": str(tmp_path / "src")}, "output": {"dir": str(tmp_path / out)},
            "conversion": {"method": "retrofit", "options": {"prelude": "0", "block": "1-2", "coda": "3",
                                                             "state_init": "zeros", **PASS}},
            "datasets": {"d": {"path": str(tmp_path / "d.txt"), "max_rows": 8}},
            "stages": [{"type": "finetune", "max_steps": 6, "lr": 0.003, "seq_len": 32, "batch_size": 2,
                        "checkpoint_every": 2, "optimizer": "muon", "muon_lr": 0.01, "schedule": "constant",
                        "recurrence": {"mean": 3, "backprop": 2, "ramp": 0.5}}]})

    run_recipe(recipe("a"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "a.run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and all("loops" in r for r in rows)
    assert rows[0]["loops"] == 1  # the curriculum starts at one loop

    def crash(stage, step):
        if step == 3:
            raise KeyboardInterrupt

    trainer._BEFORE_STEP = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe("b"), progress=False)
    finally:
        trainer._BEFORE_STEP = None
    run_recipe(recipe("b"), resume=True, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)


def test_recurrence_on_a_model_without_a_block_is_refused():
    from rnnify.distill.settings import FinetuneSettings
    from rnnify.distill.stages import build_objective

    student = convert(tiny_model("llama"), "supra")
    with pytest.raises(RnnifyError, match="the model has no recurrent block"):
        build_objective("finetune", student, None, FinetuneSettings(max_steps=1, recurrence={"mean": 2}))


def test_a_random_initial_state_answers_the_same_way_twice(tmp_path):
    """state_init normal (the default): in eval mode the state is noise keyed on the block and the token's position,
    so calls repeat, greedy decoding step by step equals the parallel forward, and the saved folder loaded with
    trust_remote_code gives the same outputs; in training mode the noise is fresh at every call, as the paper trains."""
    from transformers import AutoModelForCausalLM

    from rnnify.modeling.recurrent_block import position_noise

    student = convert(tiny_model("llama"), "retrofit", options={"prelude": "0", "block": "1-2", "coda": "3",
                                                                "recurrence": 3})
    assert student.config.program[1]["state_init"] == "normal"
    student.eval()
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = student(x).logits, student(x).logits
        assert torch.equal(a, b)
        out = student.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        again = student.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
        assert torch.equal(out.sequences, again)
        full = student(out.sequences).logits  # the parallel forward over prompt + continuation
        torch.testing.assert_close(torch.stack(out.scores, 1), full[:, 8:-1], atol=1e-4, rtol=1e-4)
    student.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, a, atol=1e-5, rtol=1e-5)

    student.train()
    assert not torch.equal(student(x).logits, student(x).logits)
    # the noise is a normal of std 1 per channel, different per position and per block
    n = position_noise(torch.arange(4096), 64, key=1001)
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    assert not torch.equal(n[0], n[1]) and not torch.equal(n, position_noise(torch.arange(4096), 64, key=1002))


def test_a_damped_adapter_starts_at_the_source_and_lets_the_second_loop_count():
    """damped: A = [I/2 | I/2] with s_0 = e. One loop is the source without the dropped layers (as passthrough), and
    unlike passthrough, whose loops all compute the same thing, a second loop changes the output."""
    teacher = tiny_model("llama")
    split = {"prelude": "0", "block": "2", "coda": "3", "recurrence": 1}
    damped = convert(teacher, "retrofit", options={**split, "adapter_init": "damped", "state_init": "prelude"})
    passthrough = convert(teacher, "retrofit", options={**split, **PASS})
    d = teacher.config.hidden_size
    assert torch.equal(damped.blocks[0].adapter.weight, torch.cat([torch.eye(d), torch.eye(d)], 1) / 2)
    x = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert torch.allclose(damped(x).logits, truncated_source(teacher, [0, 2, 3])(x).logits, atol=1e-5)
        assert torch.equal(passthrough(x, recurrence=2).logits, passthrough(x, recurrence=1).logits)
        assert not torch.allclose(damped(x, recurrence=2).logits, damped(x, recurrence=1).logits, atol=1e-3)
    with pytest.raises(RnnifyError, match="damped .* needs state_init prelude"):
        convert(teacher, "retrofit", options={**split, "adapter_init": "damped", "state_init": "zeros"})
