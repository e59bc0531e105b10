"""The converted-model format: equivalences, recurrent == parallel, and independent references."""

import math

import pytest
import torch

from rnnify.convert import convert
from rnnify.modeling import RnnifyConfig, RnnifyForCausalLM
from rnnify.modeling.mixer_base import apply_rope
from rnnify.modeling.mixer_lolcats import LolcatsMixer
from rnnify.modeling.mixer_supra import SupraMixer
from rnnify.modeling.mixers import get_mixer

from .conftest import tiny_model

SMALL = {"supra": {"chunk_size": 8}, "lolcats": {"chunk_size": 8, "window": 4, "sinks": 2}}


def test_kept_layers_reuse_the_source_modules_and_names(tiny_llama):
    student = convert(tiny_llama, "supra", keep_attention="0,3")
    t_sd, s_sd = tiny_llama.state_dict(), student.state_dict()
    for name, w in t_sd.items():
        assert torch.equal(s_sd[name], w), name
    new = set(student.new_parameter_names())
    assert new and all(".self_attn.feature_map" in n or ".self_attn.norm" in n for n in new)
    assert {int(n.split(".")[2]) for n in new} == {1, 2}
    assert student.config.layer_types == ["full_attention", "linear_attention", "linear_attention", "full_attention"]


def _one_mixer(method, settings=None, seed=0):
    teacher = tiny_model("llama", seed=seed)
    student = convert(teacher, method, options={**SMALL[method], **(settings or {})})
    mixer = student.model.layers[0].self_attn
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return student, mixer


def _rope(student, T):
    x = torch.zeros(1, T, student.config.hidden_size)
    return student.model.rotary_emb(x, torch.arange(T)[None])


def test_supra_matches_a_plain_pytorch_token_loop():
    student, m = _one_mixer("supra")
    T = 21
    h = torch.randn(1, T, student.config.hidden_size)
    cos, sin = _rope(student, T)
    with torch.no_grad():
        out, _ = m(h, position_embeddings=(cos, sin))
        H, D, rep = m.num_heads, m.head_dim, m.num_heads // m.num_kv_heads
        q = (h @ m.q_proj.weight.T).view(T, H, D)
        k = (h @ m.k_proj.weight.T).view(T, -1, D).repeat_interleave(rep, 1)
        v = (h @ m.v_proj.weight.T).view(T, -1, D).repeat_interleave(rep, 1)
        fq = torch.relu(q @ m.feature_map_q.weight.T + m.feature_map_q.bias)
        fk = torch.relu(k @ m.feature_map_k.weight.T + m.feature_map_k.bias)
        c, s = cos[0][:, None], sin[0][:, None]
        half = lambda x: torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)  # noqa: E731
        fq, fk = fq * c + half(fq) * s, fk * c + half(fk) * s
        gamma = m.log_decay.exp()
        ys = []
        for t in range(T):
            y = torch.zeros(H, D)
            for u in range(t + 1):
                w = gamma ** (t - u) * (fq[t] * fk[u]).sum(-1) / math.sqrt(D)  # [H]
                y += w[:, None] * v[u]
            mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
            y = (y - mu) / torch.sqrt(var + m.norm.eps)
            ys.append(y.reshape(-1) * m.norm.weight + m.norm.bias)
        ref = torch.stack(ys) @ m.o_proj.weight.T
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [3, 9, 20])
@pytest.mark.parametrize("halflife", [None, 3.0])
def test_lolcats_matches_the_dense_formula(T, halflife):
    student, m = _one_mixer("lolcats", {"window": 4, "sinks": 2, "memory_halflife": halflife})
    m.query_block = 5  # exercise the query blocking
    h = torch.randn(1, T, student.config.hidden_size)
    cos, sin = _rope(student, T)
    with torch.no_grad():
        out, _ = m(h, position_embeddings=(cos, sin))
        H, D, rep = m.num_heads, m.head_dim, m.num_heads // m.num_kv_heads
        q = (h @ m.q_proj.weight.T).view(1, T, H, D)
        k = (h @ m.k_proj.weight.T).view(1, T, -1, D)
        v = (h @ m.v_proj.weight.T).view(1, T, -1, D).repeat_interleave(rep, 2)[0]
        q, k = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin).repeat_interleave(rep, 2)[0]
        fq, fk = m.feature_map_q(q[None])[0], m.feature_map_k(k[None])[0]
        a_ln = torch.sigmoid(m.linear_mix_logit)
        t_idx, s_idx = torch.arange(T)[:, None], torch.arange(T)[None]
        causal = s_idx <= t_idx
        in_softmax = causal & ((s_idx < 2) | (s_idx > t_idx - 4))
        in_linear = causal & ~in_softmax
        scores = torch.einsum("thd,shd->hts", q, k) * m.scaling
        scores = scores.masked_fill(~in_softmax, float("-inf"))
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        lin = torch.einsum("thf,shf->hts", fq, fk) * in_linear
        if halflife is not None:  # token s left the window at step s + 4: it has decayed t - s - 4 times since
            gamma = torch.exp(-torch.exp(m.decay_log_rate))
            lin = lin * gamma[:, None, None] ** (t_idx - s_idx - 4).clamp_min(0)[None]
        w = (1 - a_ln)[:, None, None] * e + a_ln[:, None, None] * lin
        y = torch.einsum("hts,shd->thd", w / w.sum(-1, keepdim=True), v)
        ref = y.reshape(T, -1) @ m.o_proj.weight.T
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)


def test_lolcats_decaying_memory_decodes_step_by_step_and_with_padding():
    """memory_halflife: the chunked prefill, token-by-token decoding and left-padded rows agree."""
    from .test_methods import perturb, stepwise_logits

    student = perturb(convert(tiny_model("llama"), "lolcats", keep_attention="2",
                              options={**SMALL["lolcats"], "memory_halflife": 5.0}), scale=0.3)
    assert any(n.endswith("decay_log_rate") for n in student.new_parameter_names())
    x = torch.randint(4, 128, (2, 23))
    with torch.no_grad():
        full = student(x).logits
        for prefill in (1, 6, 17):
            torch.testing.assert_close(stepwise_logits(student, x, prefill), full, atol=1e-4, rtol=1e-4)
        pad = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[1:, :18]], 1)
        mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 18)], 1).long()
        batched = student(torch.cat([x[:1], pad]), attention_mask=torch.cat([torch.ones(1, 23).long(), mask]),
                          position_ids=(torch.cat([torch.ones(1, 23).long(), mask]).cumsum(-1) - 1).clamp_min(0)).logits
        torch.testing.assert_close(batched[1, 5:], student(x[1:, :18]).logits[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="merge_heads"):
        convert(tiny_model("llama"), "lolcats", options={"memory_halflife": 5.0, "merge_heads": True})


def test_untrained_lolcats_is_close_to_its_window_model(tiny_llama):
    """The linear branch starts at sigmoid(-6): the untrained conversion ~ window + sinks softmax."""
    student = convert(tiny_llama, "lolcats", options=SMALL["lolcats"])
    off = convert(tiny_llama, "lolcats", options={**SMALL["lolcats"], "init_linear_mix_logit": -30.0})
    x = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        d = (student(x).logits.softmax(-1) - off(x).logits.softmax(-1)).abs().max()
    assert d < 0.01


def test_config_round_trip_and_validation(tiny_llama):
    student = convert(tiny_llama, "lolcats", keep_attention="0")
    cfg = RnnifyConfig.from_dict(student.config.to_dict())
    assert cfg.layer_types == student.config.layer_types and cfg.base_config.model_type == "llama"
    with pytest.raises(ValueError, match="accepted: attention"):
        get_mixer("mamba9")
    with pytest.raises(ValueError, match="unknown mixer 'bogus'"):
        RnnifyConfig(base_config=tiny_llama.config, program=[{"layer": i, "mixer": "bogus"} for i in range(4)])
    with pytest.raises(ValueError, match="4 layers"):
        RnnifyConfig(base_config=tiny_llama.config, layer_mixers=["supra"])
    assert isinstance(RnnifyForCausalLM(cfg).model.layers[1].self_attn, LolcatsMixer)
    assert SupraMixer.default_log_decay(9).exp().max() < 1


def test_an_older_transformers_is_refused_by_name(monkeypatch):
    """The floor in pyproject.toml is the one the shipped modeling code checks; below it, a clear ImportError."""
    import re
    import runpy
    from pathlib import Path

    import transformers

    from rnnify.modeling import generation_cache

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"transformers>=([\d.]+),', pyproject).group(1) == generation_cache.MIN_TRANSFORMERS
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(ImportError, match=r"need transformers >= 5\.24; this environment has 5\.17\.0"):
        runpy.run_path(generation_cache.__file__)
