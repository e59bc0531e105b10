"""AHN: its equivalences, each memory against a plain token loop of the AHN formulas, and its bad inputs. (Decode ==
parallel, generate, padding, bf16, save/load and cache bytes for the default memory are in the method matrix.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from rnnify.convert import convert
from rnnify.errors import RnnifyError
from rnnify.modeling.mixer_ahn import MEMORIES
from rnnify.modeling.mixer_base import apply_rope

from .conftest import FAMILIES, tiny_model

SMALL = {"window": 4, "sinks": 2, "chunk_size": 8}


def trained_like(student, seed=0):
    """Move every memory parameter off its initial value (the zero read projection included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n in set(student.new_parameter_names()):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return student


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_untrained_ahn_is_the_window_only_model_exactly(fam, memory):
    teacher = tiny_model(fam)
    ahn = convert(teacher, "ahn", keep_attention="1", options={**SMALL, "memory": memory})
    window = convert(teacher, "window", keep_attention="1", options={"window": 4, "sinks": 2})
    x = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        assert torch.equal(ahn(x).logits, window(x).logits)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "gemma3_text"])
def test_a_window_covering_the_sequence_is_the_source_model(fam):
    """Equal up to float rounding (rnnify's softmax sums in its own order). Layers that are sliding-window attention in
    the source (qwen2, gemma3 here: window 6) keep at most their own window, so there the memory does add what the
    source never saw once trained; untrained, every family is its source."""
    teacher = tiny_model(fam)
    x = torch.randint(0, 128, (2, 20))
    ahn = convert(teacher, "ahn", options={"window": 20, "sinks": 0})
    if fam == "llama":  # nothing leaves a 20-token window: the memory stays empty whatever its weights
        trained_like(ahn)
    with torch.no_grad():
        ref = teacher(x).logits
        torch.testing.assert_close(ahn(x).logits, ref, atol=2e-5, rtol=1e-5)
        trained_like(ahn, seed=2)
        ahn.set_source_view(True)  # the self-distillation teacher, held in the same weights, with a long sequence
        long = torch.randint(0, 128, (2, 50))
        torch.testing.assert_close(ahn(long).logits, teacher(long).logits, atol=2e-5, rtol=1e-5)
        ahn.set_source_view(False)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("T", [4, 6, 17])  # inside the window + sinks, the first eviction, many
def test_step_decoding_equals_the_parallel_forward_for_every_memory(memory, T):
    student = trained_like(convert(tiny_model("qwen2"), "ahn", keep_attention="0", options={**SMALL, "memory": memory}))
    x = torch.randint(0, 128, (2, T))
    with torch.no_grad():
        full = student(x).logits
        for prefill in sorted({1, 3, min(7, T - 1), T - 1}):
            cache = DynamicCache(config=student.config)
            outs = [student(x[:, :prefill], cache=cache, use_cache=True).logits]
            for t in range(prefill, T):
                outs.append(student(x[:, t:t + 1], cache=cache, use_cache=True).logits)
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


def _reference_layer(m, h, cos, sin):
    """The AHN formulas as a plain token loop, from the module docstring: window + sinks softmax per query, and a
    memory written with the token at t - W (never a sink), gates from that token's hidden state. With merged heads
    (StateX) the memory is one head of H*D keys and values whose write gates are the heads' gates averaged; its read
    is split back into H heads of D for the norm, the read gate and the output projection."""
    T = h.shape[1]
    H, D, S, W = m.num_heads, m.head_dim, m.sinks, m.window
    M = 1 if m.merged else H  # memory heads
    Dm = H * D // M

    def per_memory_head(x):  # [H] per-head gate values -> [M]
        return x.mean(-1, keepdim=True) if m.merged else x

    rep = H // m.num_kv_heads
    q = (h @ m.q_proj.weight.T).view(1, T, H, D)
    k = (h @ m.k_proj.weight.T).view(1, T, -1, D)
    v = (h @ m.v_proj.weight.T).view(1, T, -1, D).repeat_interleave(rep, 2)[0]
    qm, km = q, k.repeat_interleave(rep, 2)  # the memory's q and k: with band gains, scaled BEFORE the rotation
    if hasattr(m, "band_gains"):  # (the module scales after it: equal only because a pair's gain commutes with RoPE)
        gq, gk = m.band_gains.repeat(1, 1, 2)
        qm, km = qm * gq, km * gk
    q, k = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin).repeat_interleave(rep, 2)[0]
    qm, km = apply_rope(qm, cos, sin)[0], apply_rope(km, cos, sin)[0]
    gates = h[0] @ m.write_gates.weight.T + m.write_gates.bias  # [T, G*H]
    read = torch.sigmoid(h[0] @ m.read_gate.weight.T + m.read_gate.bias)  # [T, H]
    state = torch.zeros(M, Dm, Dm)
    outs = []
    for t in range(T):
        s = t - W  # the token leaving the window as query t arrives
        if s >= S:
            ks, vs, gs = km[s].reshape(M, Dm), v[s].reshape(M, Dm), gates[s]
            if m.memory_kind == "mamba2":
                dt = F.softplus(gs + m.dt_bias)
                decay = torch.exp(per_memory_head(-torch.exp(m.A_log) * dt))
                dt = per_memory_head(dt)
                state = decay[:, None, None] * state + ks[:, :, None] * (dt[:, None] * vs)[:, None, :]
            else:
                ks = ks / torch.sqrt((ks * ks).sum(-1, keepdim=True) + 1e-6)
                beta = per_memory_head(torch.sigmoid(gs[:H]))
                decay = torch.ones(M) if m.memory_kind == "deltanet" else \
                    torch.exp(per_memory_head(-torch.exp(m.A_log) * F.softplus(gs[H:] + m.dt_bias)))
                state = decay[:, None, None] * state
                err = vs - torch.einsum("hk,hkv->hv", ks, state)
                state = state + beta[:, None, None] * ks[:, :, None] * err[:, None, :]
        qt = qm[t].reshape(M, Dm)
        if m.memory_kind == "mamba2":
            o = torch.einsum("hk,hkv->hv", qt, state)
        else:
            qt = qt / torch.sqrt((qt * qt).sum(-1, keepdim=True) + 1e-6)
            o = torch.einsum("hk,hkv->hv", qt, state) / math.sqrt(Dm)
        o = o.reshape(H, D)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.norm_eps) * m.norm_weight
        mem = torch.einsum("hd,hde->he", o * read[t][:, None], m.out_heads)
        keys = [j for j in range(t + 1) if j < S or j > t - W]
        scores = torch.stack([(q[t] * k[j]).sum(-1) * m.scaling for j in keys], -1)  # [H, K]
        p = scores.softmax(-1)
        win = torch.einsum("hk,khd->hd", p, torch.stack([v[j] for j in keys]))
        outs.append((win + mem).reshape(-1))
    return torch.stack(outs) @ m.o_proj.weight.T


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("band_gains", [False, True])
def test_each_memory_matches_a_token_loop_of_the_ahn_formulas(memory, band_gains):
    student = trained_like(convert(tiny_model("llama"), "ahn",
                                   options={**SMALL, "memory": memory, "band_gains": band_gains}), seed=1)
    m = student.model.layers[0].self_attn
    assert hasattr(m, "band_gains") == band_gains
    T = 21
    h = torch.randn(1, T, student.config.hidden_size)
    cos, sin = student.model.rotary_emb(h, torch.arange(T)[None])
    with torch.no_grad():
        out, _ = m(h, position_embeddings=(cos, sin))
        ref = _reference_layer(m, h, cos, sin)
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("init", ["keep", "paper"])
def test_statex_merged_memory_matches_a_token_loop_of_the_merged_formulas(memory, init):
    """StateX on an AHN model: every layer's memory becomes one head of H*D (gates averaged over the heads); the
    layer's output against the plain loop, with every parameter moved off its initial value."""
    ahn = convert(tiny_model("llama"), "ahn", options={**SMALL, "memory": memory})
    merged = convert(ahn, "statex", options={"layers": "all", "init": init})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, mixer in merged.mixers():
            for name in ("write_gates.weight", "write_gates.bias", "read_gate.weight", "out_heads", "norm_weight",
                         "A_log", "dt_bias"):
                if hasattr(mixer, name.split(".")[0]):
                    p = mixer.get_parameter(name)
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
    m = merged.model.layers[2].self_attn
    assert m.merged and m.num_heads == 4
    T = 21
    h = torch.randn(1, T, merged.config.hidden_size, generator=g)
    cos, sin = merged.model.rotary_emb(h, torch.arange(T)[None])
    with torch.no_grad():
        out, _ = m(h, position_embeddings=(cos, sin))
        ref = _reference_layer(m, h, cos, sin)
        m.merged = False  # the same weights read per head: a different function (the test can tell them apart)
        per_head = m(h, position_embeddings=(cos, sin))[0]
        m.merged = True
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)
    assert (per_head[0] - ref).abs().max() > 1e-2


def test_sinks_never_enter_the_memory_and_a_token_is_written_when_it_leaves():
    student = trained_like(convert(tiny_model("llama"), "ahn", options={**SMALL, "memory": "deltanet"}))
    m = student.model.layers[0].self_attn
    T = 12
    h = torch.randn(1, T, student.config.hidden_size)
    cos, sin = student.model.rotary_emb(h, torch.arange(T)[None])

    def memory_part(x):  # the layer's output minus its window-only output (the same layer, read projection zeroed)
        with torch.no_grad():
            full = m(x, position_embeddings=(cos, sin))[0]
            saved = m.out_heads.clone()
            m.out_heads.zero_()
            window = m(x, position_embeddings=(cos, sin))[0]
            m.out_heads.copy_(saved)
        return (full - window)[0]

    base = memory_part(h)
    assert (base[: 2 + 4].abs().amax(-1) < 1e-6).all()  # before the first eviction (query S + W = 6) nothing is read
    sink = h.clone()
    sink[0, 1] += 1.0  # a sink token: in every window, never in the memory
    torch.testing.assert_close(memory_part(sink), base, atol=1e-6, rtol=0)
    leaving = h.clone()
    leaving[0, 3] += 1.0  # leaves the window at query 3 + W = 7: the memory changes from there on, not before
    changed = (memory_part(leaving) - base).abs().amax(-1)
    assert (changed[:7] < 1e-6).all() and (changed[7:] > 1e-5).all()


def test_bad_ahn_inputs(tiny_llama_dir, tmp_path, capsys):
    from rnnify.cli import main
    from rnnify.recipe import recipe_from_dict

    for flags, needle in ((["--memory", "lstm"], "memory='lstm' is not accepted; accepted: gated_deltanet, deltanet, "
                                                 "mamba2"),
                          (["--window", "0"], "window=0 is not accepted; accepted: an integer >= 1"),
                          (["--sinks", "-1"], "sinks=-1 is not accepted; accepted: an integer >= 0")):
        assert main(["convert", str(tiny_llama_dir), "--method", "ahn", *flags, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
    base = {"model": {"source": "x"}, "output": {"dir": "o"}, "datasets": {"d": {"path": "d.txt"}},
            "conversion": {"method": "ahn", "options": {"window": 64, "sinks": 32}}}
    with pytest.raises(RnnifyError, match="sinks 32 .* seq_len 16"):
        recipe_from_dict({**base, "stages": [{"type": "self_distill", "max_steps": 1, "seq_len": 16}]})


def test_self_distillation_trains_only_the_memory_and_lowers_its_loss(tmp_path):
    import random

    from safetensors.torch import load_file

    from rnnify.pipeline.runner import run_recipe
    from rnnify.recipe import recipe_from_dict

    from .conftest import make_tokenizer

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src")
    make_tokenizer(128).save_pretrained(tmp_path / "src")
    rng = random.Random(0)
    # long-range structure: each line repeats its first words later, beyond a 4-token window
    lines = []
    for _ in range(60):
        head = [f"w{rng.randint(4, 100)}" for _ in range(6)]
        lines.append(" ".join(head + [f"w{rng.randint(4, 100)}" for _ in range(10)] + head))
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    r = recipe_from_dict({
        "model": {"source": str(tmp_path / "src")}, "output": {"dir": str(tmp_path / "out")},
        "conversion": {"method": "ahn", "options": {"window": 4, "sinks": 1, "chunk_size": 8}},
        "datasets": {"d": {"path": str(tmp_path / "d.txt"), "max_rows": 4}},
        "stages": [{"type": "self_distill", "max_steps": 10, "lr": 0.03, "seq_len": 32, "batch_size": 2,
                    "schedule": "constant", "layer_mse_weight": 0.5, "ce_weight": 0.1}],
    })
    run_recipe(r, progress=False)
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(out[k], v) for k, v in src.items()), "a source weight moved"
    new = set(out) - set(src)
    assert new and all(".self_attn." in k for k in new)
    assert any(out[k].abs().sum() > 0 for k in new if k.endswith("out_heads"))  # the zero read projection moved
    import json

    rows = [json.loads(x) for x in (tmp_path / "out.run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and "layer_mse" in rows[0]


def test_window_and_sinks_are_drawn_per_step_by_the_ahn_rule():
    from rnnify.distill.settings import SelfDistillSettings
    from rnnify.distill.stages import SelfDistillObjective

    student = convert(tiny_model("llama"), "ahn", options={"window": 8, "sinks": 2})
    s = SelfDistillSettings(max_steps=1, seq_len=64, window_choices=[4, 16, 32, 63, 64, 128], sink_choices=[0, 4, 16])
    obj = SelfDistillObjective(student, s)
    draws = set()
    for step in range(200):
        obj.set_step(7, step)
        W, S = obj.draw(64)
        assert 64 / 8 < W < 64 and S <= W / 2
        draws.add((W, S))
        obj.set_step(7, step)
        assert obj.draw(64) == (W, S)  # seeded by the step: every rank draws the same
    assert {w for w, _ in draws} == {16, 32, 63} and {s for _, s in draws} == {0, 4, 16}
    short = SelfDistillObjective(student, SelfDistillSettings(max_steps=1, seq_len=64, window_choices=[2, 4, 8, 64]))
    drawn = set()
    for step in range(50):  # no W in (L/8, L): any one below L
        short.set_step(0, step)
        drawn.add(short.draw(64)[0])
    assert drawn == {2, 4, 8}
    with pytest.raises(Exception, match="none is below seq_len"):
        SelfDistillSettings(max_steps=1, seq_len=16, window_choices=[64])
    with pytest.raises(ValueError, match="cannot run as the source attention"):
        SelfDistillObjective(convert(tiny_model("llama"), "supra"), s)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_self_distillation_loss_equals_an_independent_computation_against_the_source_model(kl):
    """The objective's KL, CE and per-layer MSE, recomputed from the untouched source model (full causal softmax)
    and the student's own forward, on the positions a query sees an evicted token (t >= window + sinks) only."""
    from rnnify.distill.settings import SelfDistillSettings
    from rnnify.distill.stages import SelfDistillObjective

    teacher = tiny_model("llama")
    student = trained_like(convert(tiny_model("llama"), "ahn", options={"window": 4, "sinks": 2, "chunk_size": 8}))
    s = SelfDistillSettings(max_steps=1, seq_len=24, temperature=2.0, kl=kl, ce_weight=0.3, layer_mse_weight=0.5)
    obj = SelfDistillObjective(student, s)
    obj.set_step(0, 0)
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        loss, metrics = obj(x)

        def pre_o_proj(model, modules):
            kept, hooks = [], [m.o_proj.register_forward_hook(lambda mod, a, out: kept.append(a[0])) for m in modules]
            logits = model(x).logits
            for h in hooks:
                h.remove()
            return logits, kept

        t_logits, t_in = pre_o_proj(teacher, [layer.self_attn for layer in teacher.model.layers])
        s_logits, s_in = pre_o_proj(student, [m for _, m in student.mixers()])
    cut, T = 6, 2.0  # window + sinks: earlier queries see every token, student == teacher there
    lt, ls = (torch.log_softmax(z[:, cut:] / T, -1) for z in (t_logits, s_logits))
    p, q = (lt, ls) if kl == "forward" else (ls, lt)
    kl_ref = (p.exp() * (p - q)).sum(-1).mean() * T**2
    ce_ref = F.cross_entropy(s_logits[:, cut - 1:-1].reshape(-1, 128), x[:, cut:].reshape(-1))
    mse_ref = torch.stack([(F.normalize(a[:, cut:], dim=-1) - F.normalize(b[:, cut:], dim=-1)).pow(2).mean()
                           for a, b in zip(s_in, t_in)]).mean()
    assert kl_ref > 1e-3 and mse_ref > 1e-4  # the memory moved the student away from its teacher
    assert metrics["kl"] == pytest.approx(float(kl_ref), rel=1e-4)
    assert metrics["ce"] == pytest.approx(float(ce_ref), rel=1e-4)
    assert metrics["layer_mse"] == pytest.approx(float(mse_ref), rel=1e-4)
    assert float(loss) == pytest.approx(float(kl_ref + 0.3 * ce_ref + 0.5 * mse_ref), rel=1e-4)
