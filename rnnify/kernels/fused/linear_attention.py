"""Chunked linear attention with a per-head scalar log-decay, forward and backward, plus a fused decode step.

The chunked algorithm (as in Yang et al. 2024, "Gated Linear Attention", sec. 3.3, with a scalar gate): with
b the cumulative log-decay inside a chunk, S the state entering it and G = b at the chunk's end,

    O      = scale * [ (Q * exp(b)) S + (causal(Q K^T) * exp(b_i - b_j)) V ]
    S_next = exp(G) S + (K * exp(G - b))^T V

Three kernels run the forward (states at every chunk boundary, then outputs, chunk-parallel) and three the
backward (state gradients in reverse, dv, then dq/dk/dlog-decay). The log-decay gradient uses the identity
d/db_i = q_i.dq_i - k_i.dk_i (+ <S_next, dS_next> at the chunk end), then a within-chunk reverse cumsum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .common import (
    check_chunk_size,
    chunk_gates,
    chunk_rows,
    common_dtype,
    dot,
    exact_dots,
    flat,
    flat_log_decay,
    initial_tile,
    launch,
    load_rows,
    prepare_varlen,
    seq_bounds,
    seq_chunk,
    state_tile,
    store_rows,
    store_tile,
)


@triton.jit
def fwd_h_kernel(k, v, g, h, h0, ht, cu_seqlens, chunk_offsets,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                 EXACT: tl.constexpr):
    """State entering every chunk (h[chunk, head]) and, optionally, the final state. Sequential over chunks."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, bos, eos, boh = seq_bounds(cu_seqlens, chunk_offsets, i_nh, H)
    o_k, o_v, p_kv, m_kv = state_tile(i_k, i_v, BK, BV, K, V)
    b_h = initial_tile(h0, i_nh, p_kv, m_kv, BK, BV, K, V, USE_H0)
    for t in range(0, tl.cdiv(eos - bos, BT)):
        store_tile(h, b_h, (boh + t) * H + i_h, p_kv, m_kv, K, V)
        rows, valid = seq_chunk(bos, eos, t, BT)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
        b_v = load_rows(v, rows, valid, i_h, o_v, H, V)
        if USE_G:
            b_b, b_G = chunk_gates(g, rows, valid, i_h, H)
            b_h = b_h * tl.exp(b_G)
            b_k = (b_k.to(tl.float32) * tl.exp(b_G - b_b)[:, None]).to(b_v.dtype)
        b_h += dot(tl.trans(b_k), b_v, EXACT)
    if STORE_HT:
        store_tile(ht, b_h, i_nh, p_kv, m_kv, K, V)


@triton.jit
def fwd_o_kernel(q, k, v, g, h, o, cu_seqlens, chunk_indices, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, USE_G: tl.constexpr, EXACT: tl.constexpr):
    """Outputs of one chunk: inter-chunk part from the entering state, intra-chunk part exactly."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, rows, valid, _, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_q = load_rows(q, rows, valid, i_h, o_k, H, K)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
        b_h = tl.load(h + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0)
        b_o += dot(b_q, b_h.to(b_q.dtype), EXACT)
        b_A += dot(b_q, tl.trans(b_k), EXACT)
    causal = o_t[:, None] >= o_t[None, :]
    if USE_G:
        b_b, _ = chunk_gates(g, rows, valid, i_h, H)
        b_o = b_o * tl.exp(b_b)[:, None]
        b_A = b_A * tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], 0.0))
    b_A = tl.where(causal, b_A, 0.0)
    b_v = load_rows(v, rows, valid, i_h, o_v, H, V)
    b_o = (b_o + dot(b_A.to(b_v.dtype), b_v, EXACT)) * scale
    store_rows(o, b_o, rows, valid, i_h, o_v, H, V)


@triton.jit
def bwd_dh_kernel(q, do, g, dh, dht, dh0, cu_seqlens, chunk_offsets, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                  EXACT: tl.constexpr):
    """Gradient of the state leaving every chunk, in reverse: dS = exp(G) dS_next + scale (Q exp(b))^T dO."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, bos, eos, boh = seq_bounds(cu_seqlens, chunk_offsets, i_nh, H)
    o_k, o_v, p_kv, m_kv = state_tile(i_k, i_v, BK, BV, K, V)
    b_dh = initial_tile(dht, i_nh, p_kv, m_kv, BK, BV, K, V, USE_DHT)
    NT = tl.cdiv(eos - bos, BT)
    for i in range(0, NT):
        t = NT - 1 - i
        store_tile(dh, b_dh, (boh + t) * H + i_h, p_kv, m_kv, K, V)
        rows, valid = seq_chunk(bos, eos, t, BT)
        b_q = load_rows(q, rows, valid, i_h, o_k, H, K)
        b_do = load_rows(do, rows, valid, i_h, o_v, H, V)
        b_q = b_q.to(tl.float32) * scale
        if USE_G:
            b_b, b_G = chunk_gates(g, rows, valid, i_h, H)
            b_dh = b_dh * tl.exp(b_G)
            b_q = b_q * tl.exp(b_b)[:, None]
        b_dh += dot(tl.trans(b_q.to(b_do.dtype)), b_do, EXACT)
    if STORE_DH0:
        store_tile(dh0, b_dh, i_nh, p_kv, m_kv, K, V)


@triton.jit
def bwd_dv_kernel(q, k, g, do, dh, dv, cu_seqlens, chunk_indices, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, USE_DH: tl.constexpr, EXACT: tl.constexpr):
    """dv_j = scale sum_{i>=j} exp(b_i - b_j) (q_i.k_j) do_i  [+ exp(G - b_j) k_j dS_next when USE_DH]."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, rows, valid, _, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)  # [key j, query i]
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_q = load_rows(q, rows, valid, i_h, o_k, H, K)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
        b_A += dot(b_k, tl.trans(b_q), EXACT)
        if USE_DH:
            b_dh = tl.load(dh + (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                           mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0)
            b_dv += dot(b_k, b_dh.to(b_k.dtype), EXACT)
    later = o_t[None, :] >= o_t[:, None]
    if USE_G:
        b_b, b_G = chunk_gates(g, rows, valid, i_h, H)
        b_dv = b_dv * tl.exp(b_G - b_b)[:, None]
        b_A = b_A * tl.exp(tl.where(later, b_b[None, :] - b_b[:, None], 0.0))
    b_A = tl.where(later, b_A * scale, 0.0)
    b_do = load_rows(do, rows, valid, i_h, o_v, H, V)
    b_dv += dot(b_A.to(b_do.dtype), b_do, EXACT)
    store_rows(dv, b_dv, rows, valid, i_h, o_v, H, V)


@triton.jit
def bwd_dqk_kernel(q, k, v, g, h, do, dh, dq, dk, dg, du, dw, cu_seqlens, chunk_indices, scale, T_all,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr, EXACT: tl.constexpr):
    """dq, dk of one chunk (one K tile), this tile's share of the log-decay gradient (already reverse-summed
    within the chunk) and, for the delta rule, dw = -dU S^T."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, rows, valid, n_real, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        p_kv = (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_v = load_rows(v, rows, valid, i_h, o_v, H, V)
        b_do = load_rows(do, rows, valid, i_h, o_v, H, V)
        b_h = tl.load(h + p_kv, mask=m_kv, other=0.0)
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0.0)
        b_ds += dot(b_do, tl.trans(b_v), EXACT)
        b_dq += dot(b_do, tl.trans(b_h.to(b_do.dtype)), EXACT)
        b_dk += dot(b_v, tl.trans(b_dh.to(b_v.dtype)), EXACT)
        if USE_G:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
        if DELTA:
            b_du = load_rows(du, rows, valid, i_h, o_v, H, V)
            b_dw += dot(b_du, tl.trans(b_h.to(b_du.dtype)), EXACT)
    b_q = load_rows(q, rows, valid, i_h, o_k, H, K)
    b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
    causal = o_t[:, None] >= o_t[None, :]
    if USE_G:
        b_b, b_G = chunk_gates(g, rows, valid, i_h, H)
        b_dq = b_dq * tl.exp(b_b)[:, None]
        b_dk = b_dk * tl.exp(b_G - b_b)[:, None]
        b_ds = b_ds * tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], 0.0))
    b_ds = tl.where(causal, b_ds, 0.0) * scale
    b_dq = b_dq * scale + dot(b_ds.to(b_k.dtype), b_k, EXACT)
    # <S_next, dS_next> = exp(G) <S, dS_next> + sum_j k_j . dk_inter_j  (this K tile's share)
    s_end = tl.sum(b_k.to(tl.float32) * b_dk)
    b_dk += dot(tl.trans(b_ds.to(b_q.dtype)), b_q, EXACT)
    store_rows(dq, b_dq, rows, valid, i_h, o_k, H, K)
    store_rows(dk, b_dk, rows, valid, i_h, o_k, H, K)
    if DELTA:
        store_rows(dw, -b_dw, rows, valid, i_h, o_k, H, K)
    if USE_G:
        b_db = tl.sum(b_q.to(tl.float32) * b_dq, 1) - tl.sum(b_k.to(tl.float32) * b_dk, 1)
        s_end += tl.exp(b_G) * tl.sum(b_hdh, 0)
        b_db += tl.where(o_t == n_real - 1, s_end, 0.0)
        b_db = tl.where(valid, b_db, 0.0)
        b_dg = tl.sum(b_db, 0) - tl.cumsum(b_db, 0) + b_db  # g_t feeds b_i for every i >= t in the chunk
        tl.store(dg + (i_k * T_all + rows) * H + i_h, b_dg, mask=valid)


@triton.jit
def step_kernel(q, k, v, g, state, o, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                G_MODE: tl.constexpr):
    """One decode step for a whole batch: each program owns a [K, BV] slab of one (sequence, head) state,
    reads it once, decays and updates it in place and writes its slice of the output."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    if G_MODE == 1:
        decay = tl.exp(tl.load(g + i_bh % H).to(tl.float32))
    elif G_MODE == 2:
        decay = tl.exp(tl.load(g + i_bh).to(tl.float32))
    b_o = tl.zeros([BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_s = state + i_bh * K * V + o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_s = tl.load(p_s, mask=m_s, other=0.0)
        if G_MODE != 0:
            b_s = b_s * decay
        b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_s += b_k[:, None] * b_v[None, :]
        b_o += tl.sum(b_q[:, None] * b_s, 0)
        tl.store(p_s, b_s, mask=m_s)
    tl.store(o + i_bh * V + o_v, (b_o * scale).to(o.dtype.element_ty), mask=m_v)


# -------------------------------------------------------------------------------------------------------
# host side

def _fwd_h(k, v, g, h0, vl, BT, store_final, exact):
    H, K, V = k.shape[1], k.shape[2], v.shape[2]
    BK, BV, warps = launch("la.fwd_h", K, V)
    h = k.new_empty(vl.num_chunks, H, K, V, dtype=torch.float32 if exact else k.dtype)
    ht = k.new_empty(vl.num_seqs, H, K, V, dtype=torch.float32) if store_final else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), vl.num_seqs * H)
    fwd_h_kernel[grid](k, v, g, h, h0, ht, vl.cu_seqlens, vl.chunk_offsets, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                       USE_G=g is not None, USE_H0=h0 is not None, STORE_HT=store_final, EXACT=exact,
                       num_warps=warps)
    return h, ht


def _fwd_o(q, k, v, g, h, vl, scale, BT, exact):
    H, K, V = q.shape[1], q.shape[2], v.shape[2]
    BK, BV, warps = launch("la.fwd_o", K, V)
    o = torch.empty_like(v)
    fwd_o_kernel[(triton.cdiv(V, BV), vl.num_chunks, H)](
        q, k, v, g, h, o, vl.cu_seqlens, vl.chunk_indices, scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=g is not None, EXACT=exact, num_warps=warps)
    return o


def _bwd_dh(q, do, g, dht, need_dh0, vl, scale, BT, exact):
    H, K, V = q.shape[1], q.shape[2], do.shape[2]
    BK, BV, warps = launch("la.bwd_dh", K, V)
    dh = q.new_empty(vl.num_chunks, H, K, V, dtype=torch.float32 if exact else q.dtype)
    dh0 = q.new_empty(vl.num_seqs, H, K, V, dtype=torch.float32) if need_dh0 else None
    bwd_dh_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), vl.num_seqs * H)](
        q, do, g, dh, dht, dh0, vl.cu_seqlens, vl.chunk_offsets, scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=g is not None, USE_DHT=dht is not None, STORE_DH0=need_dh0, EXACT=exact, num_warps=warps)
    return dh, dh0


def _bwd_dv(q, k, g, do, dh, vl, scale, BT, exact):
    H, K, V = q.shape[1], q.shape[2], do.shape[2]
    BK, BV, warps = launch("la.bwd_dv", K, V)
    dv = torch.empty_like(do)
    bwd_dv_kernel[(triton.cdiv(V, BV), vl.num_chunks, H)](
        q, k, g, do, dh, dv, vl.cu_seqlens, vl.chunk_indices, scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=g is not None, USE_DH=dh is not None, EXACT=exact, num_warps=warps)
    return dv


def _bwd_dqk(q, k, v, g, h, do, dh, vl, scale, BT, exact, du=None):
    T_all, H, K = q.shape
    V = v.shape[2]
    BK, BV, warps = launch("la.bwd_dqk", K, V)
    NK = triton.cdiv(K, BK)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg = q.new_zeros(NK, T_all, H, dtype=torch.float32) if g is not None else None
    dw = torch.empty_like(k) if du is not None else None
    bwd_dqk_kernel[(NK, vl.num_chunks, H)](
        q, k, v, g, h, do, dh, dq, dk, dg, du, dw, vl.cu_seqlens, vl.chunk_indices, scale, T_all,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=g is not None, DELTA=du is not None, EXACT=exact,
        num_warps=warps)
    return dq, dk, (dg.sum(0) if dg is not None else None), dw


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, vl, BT, output_final_state):
        exact = exact_dots(q.dtype)
        h, ht = _fwd_h(k, v, g, h0, vl, BT, output_final_state, exact)
        o = _fwd_o(q, k, v, g, h, vl, scale, BT, exact)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.vl, ctx.scale, ctx.BT = vl, scale, BT
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        vl, scale, BT = ctx.vl, ctx.scale, ctx.BT
        exact = exact_dots(q.dtype)
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        h, _ = _fwd_h(k, v, g, h0, vl, BT, False, exact)  # recomputed: cheaper than keeping every chunk state
        dh, dh0 = _bwd_dh(q, do, g, dht, h0 is not None, vl, scale, BT, exact)
        dv = _bwd_dv(q, k, g, do, dh, vl, scale, BT, exact)
        dq, dk, dg, _ = _bwd_dqk(q, k, v, g, h, do, dh, vl, scale, BT, exact)
        return dq, dk, dv, dg, dh0, None, None, None, None


def chunk_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                           chunk_size: int = 64, cu_seqlens=None):
    """Triton twin of ``reference.chunk_linear_attention`` (same arguments, same results)."""
    reference._check(q, k, v, initial_state if cu_seqlens is None else None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = check_chunk_size(chunk_size)
    scale = K**-0.5 if scale is None else float(scale)
    vl = prepare_varlen(q, cu_seqlens, initial_state, V, BT)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    out_dtype = v.dtype
    q, k, v = common_dtype(q, k, v)
    o, ht = _ChunkLinearAttention.apply(flat(q), flat(k), flat(v), flat_log_decay(g, B, T, H), h0, scale, vl, BT,
                                        output_final_state)
    return o.view(B, T, H, V).to(out_dtype), ht


def linear_attention_step(q, k, v, g, state, scale=None):
    """Fused decode step: updates ``state`` [B, H, K, V] in place (when it is contiguous fp32) and returns (o, state)."""
    B, H, K = q.shape
    V = v.shape[-1]
    if tuple(state.shape) != (B, H, K, V):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected {(B, H, K, V)}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        state = state.float().contiguous()  # a copy: updated and returned
    scale = K**-0.5 if scale is None else float(scale)
    G_MODE = 0 if g is None else (1 if g.dim() == 1 else 2)
    g = None if g is None else g.float().contiguous()
    o = v.new_empty(B, H, V)
    BK, BV, warps = launch("la.step", K, V)
    step_kernel[(triton.cdiv(V, BV), B * H)](q.contiguous(), k.contiguous(), v.contiguous(), g, state, o, scale,
                                             H=H, K=K, V=V, BK=BK, BV=BV, G_MODE=G_MODE,
                                             num_warps=warps)
    return o, state
