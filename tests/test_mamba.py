"""Mamba-in-the-Llama: the Mamba2 mixer, its initialisation from attention, layer plans, stepwise stages."""

import pytest
import torch
import torch.nn.functional as F

from rnnify.convert import attention_layers, convert, spread_layers
from rnnify.distill.settings import DistillSettings
from rnnify.distill.stages import DistillObjective, active_layers
from rnnify.errors import RnnifyError

from .conftest import tiny_model

OPTS = {"chunk_size": 8}


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_initialisation_copies_the_papers_rows(fam):
    teacher = tiny_model(fam)
    student = convert(teacher, "mamba_in_llama", keep_attention="0", options=OPTS)
    for i in (1, 2, 3):
        m, a = student.model.layers[i].self_attn, teacher.model.layers[i].self_attn
        z, x, b, c, dt = m._split()
        w = m.in_proj.weight
        assert torch.equal(w[z : z + x], a.v_proj.weight)  # x <- V
        assert torch.equal(w[z + x : z + x + b], a.k_proj.weight)  # B <- K
        assert torch.equal(w[z + x + b : z + x + b + c], a.q_proj.weight)  # C <- Q
        assert torch.equal(m.out_proj.weight, a.o_proj.weight)  # out_proj <- O
        if a.q_proj.bias is not None:
            assert torch.equal(m.in_proj.bias[z + x + b : z + x + b + c], a.q_proj.bias)
        # fresh parts follow Mamba2: A in [1, 16], dt = softplus(dt_bias) in [1e-3, 1e-1], D = 1
        A = m.A_log.exp()
        assert ((A >= 1) & (A <= 16)).all()
        dt = F.softplus(m.dt_bias)
        assert ((dt >= 1e-4) & (dt <= 0.1 + 1e-6)).all() and torch.equal(m.D, torch.ones_like(m.D))
    # MLPs and norms are the teacher's
    assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    # the conversion is deterministic (resumed runs rebuild the same student)
    again = convert(teacher, "mamba_in_llama", keep_attention="0", options=OPTS)
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), again.parameters()))


def test_attention_fraction_one_reproduces_the_teacher():
    teacher = tiny_model("gemma3_text")
    x = torch.randint(0, 128, (2, 17))
    student = convert(teacher, "mamba_in_llama", attention_fraction=1.0)
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


@pytest.mark.parametrize("init", ["paper", "attention"])
def test_mamba2_matches_a_plain_token_loop(init):
    student = convert(tiny_model("llama"), "mamba_in_llama", options={**OPTS, "init": init})
    m = student.model.layers[0].self_attn
    with torch.no_grad():
        m.norm.weight.normal_(1, 0.2)
        if init == "attention":  # move off the start so every term counts
            m.in_proj.weight.add_(0.1 * torch.randn_like(m.in_proj.weight))
            m.in_proj.bias.add_(0.1 * torch.randn_like(m.in_proj.bias))
            m.D.add_(0.5)
    T = 13
    h = torch.randn(1, T, student.config.hidden_size)
    with torch.no_grad():
        out, _ = m(h)
        H, Hkv, D, K = m.num_heads, m.num_kv_heads, m.head_dim, m.conv_kernel
        zxbcdt = h[0] @ m.in_proj.weight.T + (0 if m.in_proj.bias is None else m.in_proj.bias)
        z, xBC, dt = zxbcdt.split([H * D, H * D + 2 * Hkv * D, H], -1)
        w, bias = m.conv1d.weight[:, 0], m.conv1d.bias
        padded = torch.cat([torch.zeros(K - 1, xBC.shape[1]), xBC])
        conv = torch.stack([(padded[t : t + K].T * w).sum(-1) + bias for t in range(T)])
        conv = conv * torch.sigmoid(conv)
        x, Bm, C = conv.split([Hkv * D, Hkv * D, H * D], -1)
        rep = H // Hkv
        x = x.view(T, Hkv, D).repeat_interleave(rep, 1)
        Bm = Bm.view(T, Hkv, D).repeat_interleave(rep, 1)
        C = C.view(T, H, D)
        dt = F.softplus(dt + m.dt_bias)
        A = -m.A_log.exp()
        S = torch.zeros(H, D, D)
        ys = []
        for t in range(T):
            S = torch.exp(dt[t] * A)[:, None, None] * S + Bm[t][:, :, None] * (dt[t][:, None] * x[t])[:, None, :]
            y = torch.einsum("hk,hkv->hv", C[t], S) + m.D[:, None] * x[t]
            g = (y * F.silu(z[t].view(H, D)))
            g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.eps)
            ys.append(g.reshape(-1) * m.norm.weight)
        ref = torch.stack(ys) @ m.out_proj.weight.T
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)


def test_attention_init_reads_the_attention_as_decayed_linear_attention():
    """init: attention: the untrained Mamba2 layer is the decayed linear attention of silu(Q), silu(K), silu(V)
    (identity conv, D = 0, gate silu(z) = 1 for every input, a constant dt per head), read through the per-head RMSNorm
    and O; the paper's init is not (its random gate and conv)."""
    teacher = tiny_model("llama")
    student = convert(teacher, "mamba_in_llama", keep_attention="0", options={**OPTS, "init": "attention"})
    paper = convert(teacher, "mamba_in_llama", keep_attention="0", options=OPTS)
    m, a = student.model.layers[1].self_attn, teacher.model.layers[1].self_attn
    T = 11
    h = torch.randn(2, T, student.config.hidden_size)
    with torch.no_grad():
        out, _ = m(h)
        H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
        rep = H // Hkv
        q = F.silu(a.q_proj(h)).view(2, T, H, D)
        k = F.silu(a.k_proj(h)).view(2, T, Hkv, D).repeat_interleave(rep, 2)
        v = F.silu(a.v_proj(h)).view(2, T, Hkv, D).repeat_interleave(rep, 2)
        dt = F.softplus(m.dt_bias)  # [H]: no data dependence yet
        decay = torch.exp(-dt * m.A_log.exp())
        ys, S = [], torch.zeros(2, H, D, D)
        for t in range(T):
            S = decay[None, :, None, None] * S + k[:, t, :, :, None] * (dt[None, :, None] * v[:, t])[:, :, None, :]
            ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        y = torch.stack(ys, 1)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps)
        ref = (y.reshape(2, T, H * D) * m.norm.weight) @ a.o_proj.weight.T
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        other, _ = paper.model.layers[1].self_attn(h)
        assert not torch.allclose(other, ref, atol=1e-2)


def test_an_all_recurrent_cache_knows_its_length():
    """No attention layer: transformers' DynamicCache has no layer to read the length from (5.17's generate asks
    for it and raised); the model's cache answers with the tokens it consumed, also for a cache the user built."""
    from transformers import DynamicCache

    student = convert(tiny_model("llama"), "mamba_in_llama", attention_fraction=0)
    x = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        out = student(x, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        assert cache.get_seq_length() == 11
        user = DynamicCache(config=student.config)
        student(x[:, :7], cache=user, use_cache=True)
        student(x[:, 7:8], cache=user, use_cache=True)
        assert user.get_seq_length() == 8
        gen = student.generate(x, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 14)


def test_layer_plans():
    assert spread_layers(30, 0.5) == list(range(0, 30, 2))
    assert spread_layers(30, 0.25) == [0, 4, 8, 11, 15, 19, 22, 26]
    assert spread_layers(32, 0.125) == [0, 8, 16, 24] and spread_layers(30, 0) == []
    assert attention_layers(12, attention_every=4) == [0, 4, 8]
    assert attention_layers(12, keep_attention="1,3") == [1, 3]
    with pytest.raises(RnnifyError, match="only one of"):
        attention_layers(12, keep_attention="1", attention_fraction=0.5)
    with pytest.raises(RnnifyError, match="not in \\[0, 1\\]"):
        attention_layers(12, attention_fraction=1.5)
    with pytest.raises(RnnifyError, match="must be >= 1"):
        attention_layers(12, attention_every=0)


def test_cli_plan_and_bad_conv_init(tiny_llama_dir, tmp_path, capsys):
    import json

    from rnnify.cli import main

    assert main(["inspect", str(tiny_llama_dir), "--method", "mamba_in_llama", "--attention-fraction", "0.5",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["attention_layers"] == [0, 2] and plan["layer_types"][1] == "linear_attention"
    assert main(["convert", str(tiny_llama_dir), "--method", "mamba_in_llama", "--conv-init", "zeros",
                 "--out", str(tmp_path / "o")]) == 2
    assert "conv_init='zeros' is not accepted; accepted: default, identity" in capsys.readouterr().err


def test_stepwise_inactive_layers_run_the_teachers_attention():
    teacher = tiny_model("llama")
    student = convert(teacher, "mamba_in_llama", options=OPTS)
    x = torch.randint(0, 128, (2, 15))
    nothing_active = DistillObjective(student, teacher, active=[])
    with torch.no_grad():
        torch.testing.assert_close(nothing_active.student_logits(x), teacher(x).logits, atol=1e-5, rtol=1e-5)
        loss, _ = nothing_active(x)
    assert loss.abs() < 1e-6
    # the swap is undone afterwards
    assert type(student.model.layers[0].self_attn).__name__ == "Mamba2Mixer"
    some = DistillObjective(student, teacher, active=[1, 3])
    loss, _ = some(x)
    loss.backward()
    grads = {i: student.model.layers[i].self_attn.A_log.grad for i in range(4)}
    assert grads[0] is None and grads[2] is None and grads[1] is not None and grads[3] is not None
    settings = DistillSettings(max_steps=1, active_attention_fraction=0.5)
    assert active_layers(student, settings) == [1, 3]
    with pytest.raises(RnnifyError, match="not converted layers"):
        active_layers(convert(teacher, "mamba_in_llama", keep_attention="1"), DistillSettings(max_steps=1, active_layers=[1]))


@pytest.mark.parametrize("fam,init", [("llama", "paper"), ("qwen2", "paper"), ("llama", "attention")])
def test_export_to_bamba_is_exact(fam, init, tmp_path):
    import transformers

    from rnnify.export import to_bamba

    teacher = tiny_model(fam)
    if fam == "qwen2":  # full attention everywhere (Bamba has no sliding window)
        teacher.config.use_sliding_window = False
        teacher.config.layer_types = ["full_attention"] * 4
    student = convert(teacher, "mamba_in_llama", keep_attention="1", options={**OPTS, "init": init})
    with torch.no_grad():
        for _, m in student.mixers():  # move off the initial values so every mapped piece matters
            for p in (m.conv1d.bias, m.D, m.norm.weight, m.dt_bias):
                p.add_(0.1 * torch.randn_like(p))
    bamba = to_bamba(student)
    bamba.save_pretrained(tmp_path / "bamba")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bamba")
    assert type(loaded).__name__ == "BambaForCausalLM" and loaded.config.attn_layer_indices == [1]
    x = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, student(x).logits, atol=1e-4, rtol=1e-4)


def test_export_refuses_what_does_not_map():
    from rnnify.export import to_bamba

    with pytest.raises(RnnifyError, match="cannot export to Bamba: mixers"):
        to_bamba(convert(tiny_model("llama"), "lolcats"))
    with pytest.raises(RnnifyError, match="sliding-window"):
        to_bamba(convert(tiny_model("mistral"), "mamba_in_llama", options=OPTS))
    with pytest.raises(RnnifyError, match="base architecture gemma3_text"):
        to_bamba(convert(tiny_model("gemma3_text"), "mamba_in_llama", options=OPTS))
    # a looped (retrofitted) model: every layer is attention, but the adapter and loop count have no place in Bamba
    looped = convert(tiny_model("llama"), "retrofit", options={"prelude": "0", "block": "1-2", "coda": "3"})
    with pytest.raises(RnnifyError, match="a block of layers run 4 times with an input adapter"):
        to_bamba(looped)


def test_an_export_whose_logits_differ_is_refused():
    from rnnify.export import check_same_logits, to_bamba

    student = convert(tiny_model("llama"), "mamba_in_llama", keep_attention="1", options=OPTS)
    bamba = to_bamba(student)  # passes its own check
    with torch.no_grad():
        bamba.model.layers[2].mamba.D.add_(0.5)  # one weight the mapping could have missed
    with pytest.raises(RnnifyError, match="cannot export to BambaForCausalLM: its logits differ"):
        check_same_logits(student, bamba)
