"""The converted-model format: equivalences, recurrent == parallel, and independent references."""

import math

import pytest
import torch
from transformers import DynamicCache

from rnnify.convert import convert
from rnnify.modeling import RnnifyConfig, RnnifyForCausalLM
from rnnify.modeling.mixers import LolcatsMixer, SupraMixer, apply_rope, get_mixer

from .conftest import FAMILIES, tiny_model

SMALL = {"supra": {"chunk_size": 8}, "lolcats": {"chunk_size": 8, "window": 4, "sinks": 2}}


@pytest.mark.parametrize("fam", FAMILIES)
def test_keeping_every_layer_as_attention_reproduces_the_source_exactly(fam):
    teacher = tiny_model(fam)
    x = torch.randint(0, 128, (2, 23))
    student = convert(teacher, "lolcats", keep_attention="0-3")
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


def test_kept_layers_reuse_the_source_modules_and_names(tiny_llama):
    student = convert(tiny_llama, "supra", keep_attention="0,3")
    t_sd, s_sd = tiny_llama.state_dict(), student.state_dict()
    for name, w in t_sd.items():
        assert torch.equal(s_sd[name], w), name
    new = set(student.new_parameter_names())
    assert new and all(".self_attn.feature_map" in n or ".self_attn.norm" in n for n in new)
    assert {int(n.split(".")[2]) for n in new} == {1, 2}
    assert student.config.layer_types == ["full_attention", "linear_attention", "linear_attention", "full_attention"]


def _stepwise_logits(model, x, prefill):
    cache = DynamicCache(config=model.config)
    outs = [model(x[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, x.shape[1]):
        outs.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("method", ["supra", "lolcats"])
@pytest.mark.parametrize("T", [16, 19])  # a multiple of the chunk (8) and not
def test_recurrent_decoding_matches_parallel_forward(family, method, T):
    teacher = tiny_model(family)
    student = convert(teacher, method, keep_attention="1", options=SMALL[method])
    if method == "lolcats":  # make the linear branch matter
        for _, m in student.mixers():
            torch.nn.init.normal_(m.linear_mix_logit)
    x = torch.randint(0, 128, (2, T))
    with torch.no_grad():
        full = student(x).logits
        for prefill in (1, 5, 9):
            assert (_stepwise_logits(student, x, prefill) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["supra", "lolcats"])
def test_generate_uses_the_recurrent_cache(family, method):
    teacher = tiny_model(family)
    student = convert(teacher, method, options=SMALL[method])  # every layer converted
    x = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        out = student.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=13, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        full = student(out.sequences).logits
    scores = torch.stack(out.scores, 1)
    assert out.sequences.shape[1] == 19
    assert (scores - full[:, 5:-1]).abs().max() <= 1e-4
    # the cache holds fixed-size states, not per-token keys
    cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
    assert all(cache.is_linear)


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
def test_lolcats_matches_the_dense_formula(T):
    student, m = _one_mixer("lolcats", {"window": 4, "sinks": 2})
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
        w = (1 - a_ln)[:, None, None] * e + a_ln[:, None, None] * lin
        y = torch.einsum("hts,shd->thd", w / w.sum(-1, keepdim=True), v)
        ref = y.reshape(T, -1) @ m.o_proj.weight.T
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)


def test_supra_left_padding_matches_unpadded_rows():
    teacher = tiny_model("llama")
    student = convert(teacher, "supra", keep_attention="2", options=SMALL["supra"])
    a, b = torch.randint(4, 128, (1, 12)), torch.randint(4, 128, (1, 7))
    x = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = student(x, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(batched[0], student(a).logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched[1, 5:], student(b).logits[0], atol=1e-4, rtol=1e-4)


def test_new_parameters_receive_gradients(tiny_llama):
    for method in ("supra", "lolcats"):
        student = convert(tiny_llama, method, options=SMALL[method]).train()
        x = torch.randint(0, 128, (2, 20))
        student(x, labels=x).loss.backward()
        grads = {n: p.grad for n, p in student.named_parameters() if n in set(student.new_parameter_names())}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), method


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
    with pytest.raises(Exception, match="not known"):
        RnnifyConfig(base_config=tiny_llama.config, layer_types=["bogus"] * 4, layer_mixers=["supra"] * 4)
    with pytest.raises(ValueError, match="accepted: attention"):
        get_mixer("mamba9")
    with pytest.raises(ValueError, match="one entry per layer"):
        RnnifyConfig(base_config=tiny_llama.config, layer_types=["linear_attention"], layer_mixers=["supra"])
    assert isinstance(RnnifyForCausalLM(cfg).model.layers[1].self_attn, LolcatsMixer)
    assert SupraMixer.default_log_decay(9).exp().max() < 1
