"""The reference linear-attention ops agree with each other: chunked == naive quadratic == token loop."""

import pytest
import torch

from rnnify.kernels import reference as R


def _inputs(B, T, H, K, V, decay, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    if decay is None:
        gl = None
    elif decay == "head":
        gl = -torch.rand(H, generator=g)
    else:
        gl = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g) + 2)
    return q.to(dtype), k.to(dtype), v.to(dtype), gl


@pytest.mark.parametrize("T", [1, 15, 16, 33, 64])
@pytest.mark.parametrize("decay", [None, "head", "data"])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_naive_recurrent_agree(T, decay, with_state):
    B, H, K, V = 2, 3, 8, 5
    q, k, v, g = _inputs(B, T, H, K, V, decay)
    s0 = torch.randn(B, H, K, V) if with_state else None
    o_n, s_n = R.naive_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True)
    o_c, s_c = R.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16)
    o_r, s_r = R.recurrent_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True)
    for o in (o_c, o_r):
        torch.testing.assert_close(o, o_n, atol=1e-4, rtol=1e-4)
    for s in (s_c, s_r):
        torch.testing.assert_close(s, s_n, atol=1e-4, rtol=1e-4)


def test_chunked_against_token_loop_at_larger_shape():
    B, T, H, K, V = 1, 300, 4, 32, 32
    q, k, v, g = _inputs(B, T, H, K, V, "data", seed=1)
    o_c, s_c = R.chunk_linear_attention(q, k, v, g, output_final_state=True, chunk_size=64)
    o_r, s_r = R.recurrent_linear_attention(q, k, v, g, output_final_state=True)
    torch.testing.assert_close(o_c, o_r, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(s_c, s_r, atol=2e-4, rtol=1e-4)


def test_splitting_a_sequence_carries_the_state():
    """Two chunked calls with the state passed between them equal one call."""
    B, T, H, K, V = 2, 50, 2, 8, 8
    q, k, v, g = _inputs(B, T, H, K, V, "data", seed=2)
    o, s = R.chunk_linear_attention(q, k, v, g, output_final_state=True, chunk_size=16)
    o1, s1 = R.chunk_linear_attention(q[:, :21], k[:, :21], v[:, :21], g[:, :21], output_final_state=True, chunk_size=16)
    o2, s2 = R.chunk_linear_attention(q[:, 21:], k[:, 21:], v[:, 21:], g[:, 21:], initial_state=s1,
                                      output_final_state=True, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, s, atol=1e-4, rtol=1e-4)


def test_step_matches_definition():
    B, H, K, V = 3, 2, 4, 6
    q, k, v, _ = _inputs(B, 1, H, K, V, None, seed=3)
    s0 = torch.randn(B, H, K, V)
    g = -torch.rand(B, H)
    o, s = R.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g, s0, scale=0.5)
    s_ref = s0 * g.exp()[..., None, None] + k[:, 0, :, :, None] * v[:, 0, :, None, :]
    o_ref = 0.5 * torch.einsum("bhk,bhkv->bhv", q[:, 0], s_ref)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(o, o_ref)


def test_bf16_inputs_accumulate_in_fp32():
    B, T, H, K, V = 1, 70, 2, 16, 16
    q, k, v, g = _inputs(B, T, H, K, V, "head", seed=4)
    o32, _ = R.chunk_linear_attention(q, k, v, g)
    o16, s16 = R.chunk_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, output_final_state=True)
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    torch.testing.assert_close(o16.float(), o32, atol=0.1, rtol=0.05)


def test_bad_shapes_are_named():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="initial_state"):
        R.chunk_linear_attention(q, q, q, initial_state=torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError, match="log-decay"):
        R.chunk_linear_attention(q, q, q, g=torch.zeros(3))


def test_forced_unknown_backend_is_a_clear_error(monkeypatch):
    from rnnify import kernels

    monkeypatch.setenv("RNNIFY_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="accepted: reference"):
        kernels.chunk_linear_attention(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))


@pytest.mark.parametrize("decay", [None, "head", "data"])
def test_chunked_forms_match_the_token_loop_at_larger_shapes(decay):
    """Both chunked references (linear attention and delta rule) against the token loops, several chunks long."""
    B, T, H, K, V = 2, 300, 2, 64, 48
    q, k, v, g = _inputs(B, T, H, K, V, decay, seed=3)
    k_unit = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(B, T, H, generator=torch.Generator().manual_seed(4))
    s0 = torch.randn(B, H, K, V)
    o_c, s_c = R.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=64)
    o_r, s_r = R.recurrent_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True)
    scale = o_r.abs().max()
    assert (o_c - o_r).abs().max() <= 1e-4 * scale and (s_c - s_r).abs().max() <= 1e-4 * s_r.abs().max()
    o_c, s_c = R.chunk_delta_rule(q, k_unit, v, beta, g, initial_state=s0, output_final_state=True, chunk_size=64)
    o_r, s_r = R.recurrent_delta_rule(q, k_unit, v, beta, g, initial_state=s0, output_final_state=True)
    assert (o_c - o_r).abs().max() <= 1e-4 * o_r.abs().max() and (s_c - s_r).abs().max() <= 1e-4 * s_r.abs().max()


def test_delta_rule_is_a_regression_onto_the_values():
    """With beta = 1 and one unit key repeated, the state learns that key's latest value exactly (delta rule)."""
    K, V = 8, 4
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, K), dim=-1).expand(1, 5, 1, K)
    v = torch.randn(1, 5, 1, V)
    o, state = R.recurrent_delta_rule(k, k, v, torch.ones(1, 5, 1), scale=1.0, output_final_state=True)
    assert torch.allclose(o, v, atol=1e-5)  # reading with q = k returns the value just written
    assert torch.allclose(torch.einsum("k,kv->v", k[0, 0, 0], state[0, 0]), v[0, -1, 0], atol=1e-5)


@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
def test_chunked_reference_on_empty_sequences(op):
    """T = 0 and a packed batch holding an empty sequence: the chunked reference returns the initial state for it,
    as the token loop does (and the Triton kernels)."""
    H, K, V = 2, 4, 3
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 5, H, K, generator=g), torch.randn(1, 5, H, K, generator=g)
    v = torch.randn(1, 5, H, V, generator=g)
    beta = torch.rand(1, 5, H, generator=g)
    gl = torch.nn.functional.logsigmoid(torch.randn(1, 5, H, generator=g) + 2)
    s0 = torch.randn(3, H, K, V, generator=g)
    cu = torch.tensor([0, 2, 2, 5])
    if op == "linear_attention":
        chunk = lambda *a, **kw: R.chunk_linear_attention(*a[:3], gl if a[0].shape[1] else gl[:, :0], **kw)  # noqa: E731
        loop = lambda *a, **kw: R.recurrent_linear_attention(*a[:3], gl if a[0].shape[1] else gl[:, :0], **kw)  # noqa: E731
    else:
        chunk = lambda *a, **kw: R.chunk_delta_rule(*a[:3], beta[:, :a[0].shape[1]], gl[:, :a[0].shape[1]], **kw)  # noqa: E731
        loop = lambda *a, **kw: R.recurrent_delta_rule(*a[:3], beta[:, :a[0].shape[1]], gl[:, :a[0].shape[1]], **kw)  # noqa: E731
    o, s = chunk(q[:, :0], k[:, :0], v[:, :0], initial_state=s0[:1], output_final_state=True, chunk_size=4)
    assert o.shape == (1, 0, H, V) and torch.equal(s, s0[:1])
    o, s = chunk(q[:, :0], k[:, :0], v[:, :0], output_final_state=True, chunk_size=4)
    assert torch.equal(s, torch.zeros(1, H, K, V))
    o_c, s_c = chunk(q, k, v, initial_state=s0, output_final_state=True, chunk_size=4, cu_seqlens=cu)
    o_r, s_r = loop(q, k, v, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    torch.testing.assert_close(o_c, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_c, s_r, atol=1e-5, rtol=1e-5)
    assert torch.equal(s_c[1], s0[1])  # the empty sequence keeps its initial state
