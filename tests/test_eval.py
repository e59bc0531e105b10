"""Evaluation pieces against independent computations, and `rnnify eval` end to end."""

import json
import math

import pytest
import torch
import transformers

from rnnify.cache_size import cache_bytes
from rnnify.cli import main
from rnnify.convert import convert
from rnnify.errors import RnnifyError
from rnnify.eval.passkey import make_prompt
from rnnify.eval.perplexity import perplexity, windows
from rnnify.eval.report import results_table, write_eval
from rnnify.eval.speed import decode_speed

from .conftest import make_tokenizer, tiny_model


def test_perplexity_matches_the_models_own_loss():
    model = tiny_model("llama")
    blocks = torch.randint(0, 128, (3, 20))
    r = perplexity(model, blocks, batch_size=2)
    with torch.no_grad():
        losses = [model(b[None], labels=b[None]).loss.item() for b in blocks]
    assert r["tokens"] == 3 * 19
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_windows():
    t = torch.arange(100)
    w = windows(t, 30, 5)
    assert w.shape == (3, 30) and torch.equal(w[1], torch.arange(30, 60))
    with pytest.raises(RnnifyError, match="fewer than one context of 200"):
        windows(t, 200, 1)


def test_passkey_prompt_hides_the_key_at_the_requested_length():
    tok = make_tokenizer(128)
    # the word-level tokenizer maps every English word to <unk>; lengths still count tokens
    p = make_prompt(tok, 300, 12345, 0.5)
    assert "12345" in p and p.endswith("The pass key is")
    n = len(tok(p, add_special_tokens=False)["input_ids"])
    assert 250 <= n <= 300


def test_decode_speed_reports_the_real_cache():
    import time

    student = convert(tiny_model("llama"), "lolcats", "0", {"window": 8, "sinks": 2})
    calls = []
    student.register_forward_pre_hook(lambda mod, args, kw: calls.append(tuple(kw["input_ids"].shape)),
                                      with_kwargs=True)
    t0 = time.perf_counter()
    r = decode_speed(student, 40, new_tokens=5, batch=3, warmup=2)
    wall = time.perf_counter() - t0
    # the tokens counted are the tokens decoded: one prefill of 40, then 2 + 5 single-token steps of batch 3
    assert calls == [(3, 40)] + [(3, 1)] * 7 and r["timed_steps"] == 5
    # tokens/s is the batch over the median step, and 5 steps of which 3 took at least the median fit in the call
    assert r["decode_tokens_per_s"] == pytest.approx(3 / (r["step_ms_median"] / 1e3))
    assert 3 * r["step_ms_median"] / 1e3 <= wall and r["prefill_s"] + 3 * r["step_ms_median"] / 1e3 <= wall
    assert r["cache_tokens"] == 47 and r["cache_bytes"] == cache_bytes(student, 47, batch=3, kv_bytes=4)


def test_speed_figures_that_cannot_be_measured_are_not_printed():
    from rnnify.eval.speed import tokens_per_s

    assert tokens_per_s(4, [0.5, 0.25, 0.25]) == 16.0  # the median step
    assert tokens_per_s(4, [0.0, 0.0, 0.0]) is None and tokens_per_s(4, []) is None
    assert tokens_per_s(4, [-1.0, -1.0, 0.1]) is None
    row = results_table({"context_length": 8, "perplexity": {"windows": 1, "text": "t"},
                         "speed": {"8": {"student": {"decode_tokens_per_s": None, "cache_bytes": 10}}}})
    assert "not measurable" in row


def test_write_eval_replaces_the_card_section(tmp_path):
    (tmp_path / "README.md").write_text("# m\n\n## Evaluation\n\nold\n\n## Recipe\n\nr\n")
    results = {"context_length": 64, "perplexity": {"teacher": 10.0, "student": 12.0, "window_baseline": 14.0,
                                                      "windows": 2, "text": "builtin:wikitext-2/test.txt",
                                                      "gap_recovered": 0.5}}
    write_eval(tmp_path, results)
    card = (tmp_path / "README.md").read_text()
    assert "old" not in card and "| 10.00 | 12.00 | 14.00 |" in card and "## Recipe\n\nr" in card
    assert "recovers 50.0%" in results_table(results)
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["student"] == 12.0


def test_cli_eval(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(700)))
    out = tmp_path / "s"
    assert main(["convert", str(tiny_llama_dir), "--method", "lolcats", "--window", "8", "--out", str(out)]) == 0
    code = main(["eval", str(out), "--teacher", str(tiny_llama_dir), "--text", str(text), "--context-length", "128",
                 "--num-windows", "2", "--passkey", "--speed", "32"])
    assert code == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["perplexity"]) >= {"teacher", "student", "window_baseline"}
    speed = res["speed"]["32"]["student"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert speed["cache_bytes"] == cache_bytes(loaded, speed["cache_tokens"], kv_bytes=4)
    assert "| perplexity on" in (out / "README.md").read_text()


def test_cli_eval_at_several_context_lengths(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(700)))
    out = tmp_path / "s"
    assert main(["convert", str(tiny_llama_dir), "--method", "ahn", "--window", "8", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--teacher", str(tiny_llama_dir), "--text", str(text), "--context", "64,128",
                 "--num-windows", "2", "--passkey", "--speed", "32"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["perplexity_by_context"]) == {"64", "128"} and res["context_length"] == 64
    # untrained AHN is the window-only model
    assert res["perplexity_by_context"]["128"]["student"] == pytest.approx(res["perplexity_by_context"]["128"]["window_baseline"])
    table = capsys.readouterr().out
    assert "@ 64 tokens" in table and "@ 128 tokens" in table


def test_cli_eval_mqar_trials_and_their_bad_value(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(400)))
    out = tmp_path / "e"
    assert main(["eval", str(tiny_llama_dir), "--text", str(text), "--context", "64", "--num-windows", "1",
                 "--passkey", "--speed", "--continuations", "0", "--mqar", "2", "--mqar-trials", "3",
                 "--out", str(out)]) == 0
    row = json.loads((out / "eval.json").read_text())["mqar"]["2"]
    assert len(row["per_trial"]["student"]) == 3
    assert row["student"] == pytest.approx(sum(row["per_trial"]["student"]) / 3)
    assert main(["eval", str(tiny_llama_dir), "--text", str(text), "--mqar", "2", "--mqar-trials", "0"]) == 2
    assert "--mqar-trials 0: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_cli_eval_two_models_on_fresh_prompts_adds_their_paired_difference(tiny_llama_dir, tmp_path, capsys):
    import statistics

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from rnnify.eval.recall import mqar_accuracy

    # a character tokenizer: each prompt's length in tokens is its length in characters, so prompts drawn from
    # another seed (other keys) show in the recorded prompt length even where these random models recall nothing
    chars = ["<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"]
    char_tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    char_tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=char_tok, unk_token="<unk>").save_pretrained(tiny_llama_dir)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(400)))
    other = tmp_path / "other"
    assert main(["convert", str(tiny_llama_dir), "--method", "lolcats", "--window", "8", "--out", str(other)]) == 0
    out = tmp_path / "e"
    assert main(["eval", str(other), str(tiny_llama_dir), "--text", str(text), "--context", "64", "--num-windows", "1",
                 "--passkey", "--speed", "--continuations", "0", "--mqar", "2", "--mqar-trials", "3",
                 "--mqar-seed", "1", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    a_name, b_name = res["students"]
    row = res["mqar"]["2"]
    assert res["mqar_seed"] == 1
    # each column is what the model answers on seed 1's prompts, computed here on its own
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    for name, folder in ((a_name, other), (b_name, tiny_llama_dir)):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            alone, seed0 = (mqar_accuracy(model, tok, 2, trials=3, seed=s) for s in (1, 0))
        assert row["per_trial"][name] == alone["per_trial"]
    assert row["prompt_tokens"] == alone["prompt_tokens"] != seed0["prompt_tokens"]
    diffs = [x - y for x, y in zip(row["per_trial"][a_name], row["per_trial"][b_name])]
    assert row["paired_difference"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert row["paired_difference"]["trials"] == 3
    table = capsys.readouterr().out
    assert "MQAR recall, 2 pairs (~" in table and "prompts of seed 1)" in table
    assert f"| MQAR, 2 pairs: {a_name} minus {b_name}, paired over the same 3 trials |" in table
    assert main(["eval", str(tiny_llama_dir), "--text", str(text), "--mqar", "2", "--mqar-seed", "-1"]) == 2
    assert "--mqar-seed -1: Input should be greater than or equal to 0" in capsys.readouterr().err


def test_paired_difference_against_a_hand_count():
    from rnnify.eval.recall import paired_difference

    d = paired_difference([0.5, 0.25, 0.75], [0.25, 0.25, 0.5])  # differences 0.25, 0, 0.25
    assert d["mean"] == pytest.approx(1 / 6) and d["trials"] == 3
    assert d["stderr"] == pytest.approx(((2 * (0.25 - 1 / 6) ** 2 + (1 / 6) ** 2) / 2 / 3) ** 0.5)
    with pytest.raises(ValueError, match="paired trials: 2 against 1"):
        paired_difference([0.5, 0.5], [0.5])


def test_mqar_scoring_agrees_with_greedy_generation():
    """The one-forward teacher-forced score says 'recalled' exactly when greedy decoding produces the answer."""
    import random

    from rnnify.eval.recall import make_prompt, recalled

    model = tiny_model("llama")
    tok = make_tokenizer(128)
    rng = random.Random(0)
    context, qa = make_prompt(6, 3, rng)
    assert len(qa) == 3 and all(q.startswith("The code of") and a.strip().isdigit() for q, a in qa)
    # the word-level tokenizer has no English words; use its own vocabulary for an answer greedy decoding gives
    prompt = "w1 w2 w3 w4"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                pad_token_id=0)[0, ids.shape[1]:]
    answer = " " + tok.decode(greedy)
    assert recalled(model, tok, prompt, answer)
    wrong = " " + tok.decode([(greedy[0] + 1) % 124 + 4, greedy[1]])
    assert not recalled(model, tok, prompt, wrong)


@pytest.mark.parametrize("method,options,mixing", [
    # a recurrent state of H x D x D, read and written once per token
    ("supra", {}, lambda ctx, H, D: 4 * H * D * D),
    # softmax over sinks + window keys (half the context on average, at most 4 + 64) and the linear branch's state
    ("lolcats", {"window": 64, "sinks": 4}, lambda ctx, H, D: 4 * H * D * min(ctx / 2, 68) + 4 * H * D * D),
    # the window-only baseline: no memory
    ("window", {"window": 64, "sinks": 4}, lambda ctx, H, D: 4 * H * D * min(ctx / 2, 68)),
])
@pytest.mark.parametrize("ctx", [64, 2048])
def test_flops_per_token_counts_weights_and_each_mixers_mixing(method, options, mixing, ctx):
    """Kaplan et al. 2020 sec. 2.1: 2 x every weight a token meets, plus what its mixing reads; counted here by hand
    from the parameter shapes, against ``flops_per_token`` (which asks each mixer for its share)."""
    from rnnify.eval.flops import flops_per_token

    teacher = tiny_model("llama")
    student = convert(teacher, method, keep_attention="0", options=options)
    H, D = 4, 16
    matrices = lambda module: sum(p.numel() for p in module.parameters() if p.ndim >= 2)  # noqa: E731
    expected = 2 * student.lm_head.weight.numel() + 2 * matrices(student.model.layers[0]) + 4 * H * D * ctx / 2
    expected += sum(2 * matrices(layer) + mixing(ctx, H, D) for layer in student.model.layers[1:])
    assert flops_per_token(student, ctx) == pytest.approx(expected, rel=1e-12)


def test_several_texts_are_measured_side_by_side_each_as_if_alone(tmp_path):
    """``text: [a, b]`` (and an ``optional_text`` that exists) gives each text the perplexities it gets measured on
    its own, and the share of the window-to-teacher gap recovered on each; a missing optional text is skipped."""
    from rnnify.eval.report import evaluate
    from rnnify.eval.spec import EvalSpec

    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text(" ".join(f"w{i % 60}" for i in range(700)))
    b.write_text(" ".join(f"w{(i * 7) % 90}" for i in range(700)))
    c.write_text(" ".join(f"w{(i * 3) % 40}" for i in range(700)))
    teacher = tiny_model("llama")
    student = convert(teacher, "lolcats", keep_attention="0", options={"window": 8, "sinks": 2, "chunk_size": 16})
    tok = make_tokenizer(128)
    common = dict(context_length=64, num_windows=2, passkey_lengths=[], speed_lengths=[], continuations=0)
    res = evaluate(student, tok, EvalSpec(text=[str(a), str(b)], optional_text=[str(c), str(tmp_path / "no.txt")],
                                          **common), teacher=teacher, log=lambda *_: None)
    assert list(res["perplexity_by_text"]) == [str(a), str(b), str(c)]
    for t in (a, b, c):
        alone = evaluate(student, tok, EvalSpec(text=str(t), **common), teacher=teacher, log=lambda *_: None)
        got = res["perplexity_by_text"][str(t)]
        for name in ("teacher", "student", "window_baseline"):
            assert got[name] == pytest.approx(alone["perplexity"][name], rel=1e-6)
        gap = got["window_baseline"] - got["teacher"]  # a random tiny teacher may be no better than its window
        expected = (got["window_baseline"] - got["student"]) / gap if gap > 0 else None
        assert got["recovered"]["student"] == (pytest.approx(expected) if expected is not None else None)
    table = results_table(res)
    assert table.count("| perplexity on") == 3 and table.count("share of the window-to-teacher gap") == 3


def test_a_query_that_merges_with_the_pairs_is_read_whole():
    """A question whose first characters join the context's last token ("w6" + "0 w7" reads "w60 w7") cannot continue
    the context's cache: it is scored by the full forward, and its logits are those of the whole prompt."""
    from rnnify.eval.recall import answer_logits

    model, tok = tiny_model("llama"), make_tokenizer(128)
    context = " ".join(f"w{i}" for i in range(5, 40)) + " w6"
    qa = [("0 w7", " w8 w9"), (" w7", " w8 w9")]
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    got = answer_logits(model, tok, context, qa)
    hook.remove()
    assert shapes == [(1, 36), (1, 3), (1, 39)], shapes  # the pairs, the query that continues them, the merged one
    for (logits, a), (question, answer) in zip(got, qa):
        ids = tok(context + question + answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, len(ids) - len(a) - 1 : -1]
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
