"""The test matrix: every registered method gets these checks by being registered (as peft tests its tuners).

Each method is converted with its descriptor's ``test_options`` (small chunks and windows, so lengths below and above
both are cheap); new parameters are moved off their initial values so every part of a mixer matters. Transform
methods are run on the conversion named by their ``test_source`` attribute. Per-method files keep only what is
specific to a method (its formulas against plain-PyTorch references, its initialisation).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import DynamicCache

from rnnify.cache_size import cache_bytes, measured_cache_bytes
from rnnify.convert import METHODS, convert
from rnnify.convert.method import Transform

from .conftest import FAMILIES, tiny_model

CONVERSIONS = sorted(n for n, m in METHODS.items() if not isinstance(m, Transform))
TRANSFORMS = sorted(n for n, m in METHODS.items() if isinstance(m, Transform))
ALL = CONVERSIONS + TRANSFORMS
# (method, variant): every method with its test_options ("default"), then each of its descriptor's test_variants
VARIANTS = [(m, v) for m in ALL for v in ("default", *METHODS[m].test_variants)]
VARIANT_IDS = [m if v == "default" else f"{m}-{v}" for m, v in VARIANTS]


def perturb(model, scale=0.05, seed=0):
    """Move the conversion's new parameters off their initial values (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    names = set(model.new_parameter_names())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def build(method, family="llama", keep="1", seed=0, options=None, variant="default"):
    """A converted tiny model for ``method`` (a transform runs on its test source's conversion), with the options of
    its descriptor's ``variant``."""
    m = METHODS[method]
    options = {**(m.test_variants[variant] if variant != "default" else {}), **(options or {})}
    teacher = tiny_model(family, seed=seed)
    if isinstance(m, Transform):
        source = perturb(convert(teacher, m.test_source, keep_attention=keep,
                                 options=METHODS[m.test_source].test_options))
        return perturb(convert(source, method, options={**m.test_options, **(options or {})}), seed=1), teacher
    keep = keep if m.keeps_attention else None
    student = convert(teacher, method, keep_attention=keep, options={**m.test_options, **(options or {})})
    return perturb(student), teacher


def stepwise_logits(model, x, prefill, attention_mask=None):
    cache = DynamicCache(config=model.config)
    outs = [model(x[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, x.shape[1]):
        outs.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("method", [m for m in CONVERSIONS if METHODS[m].keeps_attention])
@pytest.mark.parametrize("fam", FAMILIES)
def test_keeping_every_layer_as_attention_is_the_source_exactly(method, fam):
    teacher = tiny_model(fam)
    x = torch.randint(0, 128, (2, 23))
    student = convert(teacher, method, keep_attention="0-3", options=METHODS[method].test_options)
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("fam", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("T", [3, 19])  # below and above the test chunk (8) and window (4)
def test_step_decoding_equals_the_parallel_forward(method, variant, fam, T):
    student, _ = build(method, fam, variant=variant)
    x = torch.randint(0, 128, (2, T))
    with torch.no_grad():
        full = student(x).logits
        for prefill in sorted({1, min(2, T - 1), min(5, T - 1), min(9, T - 1)}):
            assert (stepwise_logits(student, x, prefill) - full).abs().max() <= 1e-4, prefill


@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_generate_with_cache_equals_recomputing(method, variant):
    student, _ = build(method, "qwen2", keep=None, variant=variant)  # every layer converted (qwen2: sliding-window source)
    x = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        out = student.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=13, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        full = student(out.sequences).logits
    assert out.sequences.shape[1] == 19
    assert (torch.stack(out.scores, 1) - full[:, 5:-1]).abs().max() <= 1e-4


@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [3, 40])
def test_cache_accounting_equals_the_bytes_held(method, variant, dtype, T):
    student, _ = build(method, "qwen2", variant=variant)
    student = student.to(dtype)
    x = torch.randint(0, 128, (2, T))
    cache = DynamicCache(config=student.config)
    with torch.no_grad():
        student(x[:, : T - 1], cache=cache, use_cache=True)
        student(x[:, T - 1 :], cache=cache, use_cache=True)
    kv_bytes = torch.finfo(dtype).bits // 8
    assert measured_cache_bytes(cache) == cache_bytes(student, T, batch=2, kv_bytes=kv_bytes)


@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_left_padding_equals_the_unpadded_rows(method, variant):
    student, _ = build(method, "llama", keep="2", variant=variant)
    a, b = torch.randint(4, 128, (1, 12)), torch.randint(4, 128, (1, 7))
    x = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = student(x, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(batched[0], student(a).logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched[1, 5:], student(b).logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_new_parameters_receive_gradients(method, variant):
    student, _ = build(method, "llama", keep=None, variant=variant)
    names = set(student.new_parameter_names())
    student.train()
    x = torch.randint(0, 128, (2, 20))
    student(x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if n in names}  # (the window method creates none)
    missing = [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize("method", ALL)
def test_bfloat16_forward_decode_and_training_step(method):
    student, _ = build(method, "llama")
    student = student.to(torch.bfloat16)
    x = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        full = student(x).logits
        steps = stepwise_logits(student, x, 9)
    assert full.dtype == torch.bfloat16 and torch.isfinite(full.float()).all()
    # bf16 rounding differs between the chunked and the stepwise forms; the distributions must still agree
    p, q = full.float().softmax(-1), steps.float().softmax(-1)
    assert (p - q).abs().max() < 0.05
    student.train()
    loss = student(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss.float())


# Runs in a fresh interpreter: loads the model, prints logits and generated ids as JSON.
LOADER = textwrap.dedent(
    """
    import json, sys
    block = sys.argv[3] == "block"
    if block:  # make rnnify unimportable, as on a machine where it is not installed
        import importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "rnnify" or name.startswith("rnnify."):
                    raise ImportError("rnnify is blocked in this test")
        sys.meta_path.insert(0, Block())
        try:
            import rnnify  # noqa
            raise SystemExit("rnnify should not be importable")
        except ImportError:
            pass
    else:
        import rnnify  # noqa
    import torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=block)
    assert type(model).__name__ == "RnnifyForCausalLM", type(model)
    assert ("rnnify." in type(model).__module__) != block, type(model).__module__
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    print(json.dumps({"logits": logits.tolist(), "gen": gen.tolist()}))
    """
)


def load_in_subprocess(path, ids, mode, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, str(script), str(path), json.dumps(ids), mode],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method,variant", VARIANTS, ids=VARIANT_IDS)
def test_save_and_load_with_rnnify_and_with_trust_remote_code_alone(method, variant, tmp_path):
    from rnnify.modeling.remote_code import remote_code_sources

    student, _ = build(method, "qwen2", keep="0", variant=variant)
    path = tmp_path / "model"
    student.save_pretrained(path)
    files = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json"} | set(remote_code_sources()) <= files
    assert json.loads((path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_rnnify.RnnifyForCausalLM"
    ids = torch.randint(0, 128, (2, 13))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        original = student(ids).logits
        expected = loaded(ids).logits
        gen = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    # the source model ran eager attention, the loaded one runs the default (sdpa): equal up to rounding
    torch.testing.assert_close(expected, original, atol=1e-5, rtol=1e-5)
    for mode in ("import", "block"):
        got = load_in_subprocess(path, ids.tolist(), mode, tmp_path)
        assert torch.equal(torch.tensor(got["logits"]), expected), mode
        assert got["gen"] == gen.tolist(), mode


@pytest.mark.parametrize("method", ALL)
def test_descriptor_is_complete(method):
    """What every other part of rnnify reads from a descriptor is there (CLI help, card, ls)."""
    from rnnify.modeling import MIXERS

    m = METHODS[method]
    assert m.summary and m.paper and m.paper.url.startswith("https://")
    for name, info in m.Options.model_fields.items():
        assert info.description, f"{method}.{name} has no help line"
    assert all(MIXERS.get(x.name) is x for x in m.mixers), "every mixer a method installs is registered"
    m.resolve_options(m.test_options)
    for name, options in m.test_variants.items():  # each variant is valid and tests something the default does not
        assert m.resolve_options({**m.test_options, **options}) != m.resolve_options(m.test_options), name


@pytest.mark.parametrize("method", ["teacher", "mamba2", *ALL])
def test_mqar_reads_the_pairs_once_and_scores_each_query_as_its_full_forward(method):
    """``answer_logits`` reads the pairs once, then every query's question and answer in one batch from copies of that
    cache: each query's answer logits equal the full forward over pairs + question + answer (contexts longer than the
    window; the queries of unequal length, so the batch is padded). ``mamba2``: transformers' own Mamba2, which
    StateX's d_state path also expands."""
    from rnnify.eval.recall import answer_logits, recalled_after

    from .conftest import make_tokenizer

    if method == "mamba2":
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
            n_groups=1, expand=2, chunk_size=8)).eval()
    else:
        model = tiny_model("llama") if method == "teacher" else build(method)[0]
    tok = make_tokenizer(model.config.vocab_size)
    context = " ".join(f"w{i}" for i in range(5, 65)) + "\n"
    qa = [("w7 w9", " w11 w12"), ("w30", " w40"), ("w64 w63 w62", " w5 w6")]
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    got = answer_logits(model, tok, context, qa)
    hook.remove()
    # the pairs once, then the queries' own tokens: in one batch, or one at a time where the cache cannot repeat rows
    batched = all(hasattr(layer, "batch_repeat_interleave") for layer in DynamicCache(config=model.config).layers)
    assert shapes == ([(1, 60), (3, 5)] if batched else [(1, 60), (1, 4), (1, 2), (1, 5)]), shapes
    assert batched or method not in ("teacher", "ahn", "window"), shapes
    for (logits, a), (question, answer) in zip(got, qa):
        ids = tok(context + question + answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, len(ids) - len(a) - 1 : -1]
        assert a == ids[len(ids) - len(a):]
        torch.testing.assert_close(logits, full.float(), atol=1e-4, rtol=1e-4)
    hits = recalled_after(model, tok, context, qa)
    assert hits == [bool((lg.argmax(-1) == torch.tensor(a)).all()) for lg, a in got]
