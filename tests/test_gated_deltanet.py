"""What is specific to the gated_deltanet method: its recurrence against a token-by-token plain-PyTorch reading of
Gated DeltaNet (Yang et al. 2025, eq. 10), its initialisation from attention, and StateX on it. The test matrix
(tests/test_methods.py, tests/test_stage_matrix.py) gives it the rest."""

import math

import pytest
import torch
import torch.nn.functional as F

from rnnify.cache_size import cache_bytes
from rnnify.convert import convert

from .conftest import tiny_model
from .test_methods import perturb, stepwise_logits


def reference_layer(m, x):
    """One Gated DeltaNet layer, written token by token from the paper: S_t = a_t S_{t-1}(I - b_t k_t k_t^T) +
    b_t k_t v_t^T, o_t = S_t^T q_t; q/k L2-normalised per head, q / sqrt(D); conv, gates and output block from the
    mixer's parameters."""
    B, T, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    qkv = torch.cat([m.q_proj(x), m.k_proj(x), m.v_proj(x)], -1)
    if m.conv_kernel:
        w = m.conv1d.weight[:, 0]  # [C, W]: tap W-1 multiplies the current token
        padded = F.pad(qkv, (0, 0, m.conv_kernel - 1, 0))
        qkv = sum(padded[:, j: j + T] * w[:, j] for j in range(m.conv_kernel))
    q, k, v = torch.split(qkv, [H * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    q = q / q.norm(dim=-1, keepdim=True) / math.sqrt(D)
    k = k / k.norm(dim=-1, keepdim=True)
    beta = torch.sigmoid(m.b_proj(x))
    decay = torch.exp(-torch.exp(m.A_log) * F.softplus(m.a_proj(x) + m.dt_bias))
    S = torch.zeros(B, H, D, D)
    outs = []
    eye = torch.eye(D)
    for t in range(T):
        kt, vt, bt, at = k[:, t], v[:, t], beta[:, t, :, None, None], decay[:, t, :, None, None]
        S = at * (eye - bt * kt[..., :, None] * kt[..., None, :]) @ S + bt * kt[..., :, None] * vt[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, 1)
    if m.output_gate:
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.eps) * m.o_norm_weight
        o = o * F.silu(m.g_proj(x)).view(B, T, H, D)
    return m.o_proj(o.reshape(B, T, H * D))


@pytest.mark.parametrize("options", [{}, {"conv_kernel": 0, "output_gate": False}, {"conv_kernel": 3}])
def test_the_mixer_computes_gated_deltanet(options):
    torch.manual_seed(0)
    student = perturb(convert(tiny_model("llama"), "gated_deltanet", options={"chunk_size": 8, **options}), scale=0.3)
    m = student.model.layers[2].self_attn
    x = torch.randn(2, 21, 64)
    with torch.no_grad():
        ours, _ = m(x, position_embeddings=None)
        expected = reference_layer(m, x)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_initialisation_keeps_the_attention_and_starts_the_new_parts_where_they_say():
    teacher = tiny_model("llama")
    student = convert(teacher, "gated_deltanet", keep_attention="0", options={"beta_init": 0.25})
    for i in (1, 2, 3):
        m, attn = student.model.layers[i].self_attn, teacher.model.layers[i].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(m, name).weight, getattr(attn, name).weight)
        assert torch.equal(m.conv1d.weight[..., -1], torch.ones_like(m.conv1d.weight[..., -1]))
        assert not m.conv1d.weight[..., :-1].any()  # the conv starts as the identity
        x = torch.randn(3, 64)
        with torch.no_grad():
            torch.testing.assert_close(torch.sigmoid(m.b_proj(x)), torch.full((3, 4), 0.25))
            torch.testing.assert_close(F.silu(m.g_proj(x)), torch.ones(3, 64), atol=1e-6, rtol=0)
            decay = torch.exp(-torch.exp(m.A_log) * F.softplus(m.a_proj(x) + m.dt_bias))
        assert ((decay > 0.2) & (decay < 1)).all()  # A in [1, 16], dt in [1e-3, 0.1]: exp(-1.6) .. exp(-1e-3)
    # deterministic per layer: converting again gives the same weights
    again = convert(teacher, "gated_deltanet", keep_attention="0", options={"beta_init": 0.25})
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


def test_statex_merges_the_heads_of_a_gated_deltanet_student():
    student = perturb(convert(tiny_model("llama"), "gated_deltanet", keep_attention="0", options={"chunk_size": 8}))
    before = cache_bytes(student, 64)
    expanded = convert(student, "statex", options={"layers": "1,2", "init": "keep"})
    merged = [m.merged for _, m in expanded.mixers()]
    assert merged == [True, True, False]
    H, D = 4, 16
    assert cache_bytes(expanded, 64) - before == 2 * ((H * D) ** 2 - H * D * D) * 4  # fp32 states, 2 layers
    x = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(stepwise_logits(expanded, x, 5), expanded(x).logits, atol=2e-4, rtol=1e-4)
