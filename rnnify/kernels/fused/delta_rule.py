"""Chunked gated delta rule (DeltaNet / Gated DeltaNet), forward and backward, plus a fused decode step.

Per chunk (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule", eqs. 7-11, gated as in
Gated DeltaNet sec. 3.3), with b the within-chunk cumulative log-decay and S the entering state:

    A    = strict_tril(beta_i exp(b_i - b_j) k_i.k_j)        Tinv = (I + A)^{-1}   (``unit_lower_inverse``)
    w    = Tinv (beta exp(b) k)        u0 = Tinv (beta v)     U = u0 - w S        (the corrected values)
    then the chunk is decayed linear attention with values U:  O, S_next as in ``linear_attention``.

Only the state pass (U and S per chunk) is sequential; w, u0 and the outputs are chunk-parallel. The backward
runs the state-gradient pass in reverse (dU = dv_intra + K_end dS_next; dS = exp(G) dS_next + scale
(Q exp(b))^T dO - w^T dU), reuses the linear-attention dq/dk kernel, and back-propagates through Tinv with
d(I + A) = -Tinv^T d[u0|w] [u0|w]^T.
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
    dot_fp32,
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
from .linear_attention import _bwd_dqk, _bwd_dv, _fwd_o

MAX_K = 256  # the state pass keeps a whole [K, BV] slab of the state in registers


@triton.jit
def unit_lower_inverse(A, BT: tl.constexpr, EXACT: tl.constexpr):
    """(I + A)^{-1} for a strictly lower-triangular [BT, BT] fp32 tile, with matrix products only (tensor cores)
    instead of BT serial row steps.

    1. The 16 x 16 diagonal blocks P = I + A_diag are inverted together by forward substitution, one row offset
       r per step for all blocks at once: row_i <- e_i - sum_{j<i, same block} A_ij row_j (15 steps).
    2. With D = P^{-1} and N the strictly block-lower rest, I + A = P (I + D N) and M = D N is nilpotent
       (M^{BT/16} = 0), so (I + A)^{-1} = (I - M + M^2 - ...) D, summed by Horner's rule: exact, not a series cut.
    """
    o_t = tl.arange(0, BT)
    same_block = (o_t[:, None] // 16) == (o_t[None, :] // 16)
    A_diag = tl.where(same_block, A, 0.0)
    eye = (o_t[:, None] == o_t[None, :]).to(tl.float32)
    D = eye
    for r in range(1, 16):
        D -= dot_fp32(tl.where((o_t % 16 == r)[:, None], A_diag, 0.0), D, EXACT)
    M = dot_fp32(D, tl.where(same_block, 0.0, A), EXACT)
    X = eye
    for _ in range(1, BT // 16):
        X = eye - dot_fp32(M, X, EXACT)
    return dot_fp32(X, D, EXACT)


@triton.jit
def wy_fwd_kernel(k, v, beta, g, tinv, w, u0, cu_seqlens, chunk_indices,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, EXACT: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    n, rows, valid, _, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_t = tl.arange(0, BT)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    b_gram = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
        b_gram += dot(b_k, tl.trans(b_k), EXACT)
    strict = o_t[:, None] > o_t[None, :]
    if USE_G:
        b_b, _ = chunk_gates(g, rows, valid, i_h, H)
        b_gram = b_gram * tl.exp(tl.where(strict, b_b[:, None] - b_b[None, :], 0.0))
        b_kscale = b_beta * tl.exp(b_b)
    else:
        b_kscale = b_beta
    b_A = tl.where(strict, b_beta[:, None] * b_gram, 0.0)
    b_T = unit_lower_inverse(b_A, BT, EXACT)
    tl.store(tinv + (rows[:, None] * H + i_h) * BT + o_t[None, :], b_T, mask=valid[:, None])
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
        b_kb = (b_k.to(tl.float32) * b_kscale[:, None]).to(b_k.dtype)
        b_w = dot(b_T.to(b_k.dtype), b_kb, EXACT)
        store_rows(w, b_w, rows, valid, i_h, o_k, H, K)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_v = load_rows(v, rows, valid, i_h, o_v, H, V)
        b_vb = (b_v.to(tl.float32) * b_beta[:, None]).to(b_v.dtype)
        b_u = dot(b_T.to(b_v.dtype), b_vb, EXACT)
        store_rows(u0, b_u, rows, valid, i_h, o_v, H, V)


@triton.jit
def fwd_h_kernel(k, w, u0, g, h, vnew, h0, ht, cu_seqlens, chunk_offsets,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                 EXACT: tl.constexpr):
    """Sequential state pass: U = u0 - w S, then S <- exp(G) S + (K exp(G - b))^T U. BK covers all of K."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, boh = seq_bounds(cu_seqlens, chunk_offsets, i_nh, H)
    o_k, o_v, p_kv, m_kv = state_tile(0, i_v, BK, BV, K, V)
    b_h = initial_tile(h0, i_nh, p_kv, m_kv, BK, BV, K, V, USE_H0)
    for t in range(0, tl.cdiv(eos - bos, BT)):
        store_tile(h, b_h, (boh + t) * H + i_h, p_kv, m_kv, K, V)
        rows, valid = seq_chunk(bos, eos, t, BT)
        b_w = load_rows(w, rows, valid, i_h, o_k, H, K)
        b_u = load_rows(u0, rows, valid, i_h, o_v, H, V).to(tl.float32)
        b_u -= dot(b_w, b_h.to(b_w.dtype), EXACT)
        store_rows(vnew, b_u, rows, valid, i_h, o_v, H, V)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
        if USE_G:
            b_b, b_G = chunk_gates(g, rows, valid, i_h, H)
            b_h = b_h * tl.exp(b_G)
            b_k = (b_k.to(tl.float32) * tl.exp(b_G - b_b)[:, None]).to(b_w.dtype)
        b_h += dot(tl.trans(b_k), b_u.to(b_k.dtype), EXACT)
    if STORE_HT:
        store_tile(ht, b_h, i_nh, p_kv, m_kv, K, V)


@triton.jit
def bwd_dhu_kernel(q, k, w, g, do, dv_intra, dh, du, dht, dh0, cu_seqlens, chunk_offsets, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                   EXACT: tl.constexpr):
    """Reverse state pass: stores dS_next per chunk and the total gradient of the corrected values U."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, boh = seq_bounds(cu_seqlens, chunk_offsets, i_nh, H)
    o_k, o_v, p_kv, m_kv = state_tile(0, i_v, BK, BV, K, V)
    b_dh = initial_tile(dht, i_nh, p_kv, m_kv, BK, BV, K, V, USE_DHT)
    NT = tl.cdiv(eos - bos, BT)
    for i in range(0, NT):
        t = NT - 1 - i
        store_tile(dh, b_dh, (boh + t) * H + i_h, p_kv, m_kv, K, V)
        rows, valid = seq_chunk(bos, eos, t, BT)
        b_q = load_rows(q, rows, valid, i_h, o_k, H, K).to(tl.float32) * scale
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K)
        b_w = load_rows(w, rows, valid, i_h, o_k, H, K)
        b_do = load_rows(do, rows, valid, i_h, o_v, H, V)
        b_du = load_rows(dv_intra, rows, valid, i_h, o_v, H, V).to(tl.float32)
        if USE_G:
            b_b, b_G = chunk_gates(g, rows, valid, i_h, H)
            b_k = (b_k.to(tl.float32) * tl.exp(b_G - b_b)[:, None]).to(b_w.dtype)
            b_q = b_q * tl.exp(b_b)[:, None]
        b_du += dot(b_k, b_dh.to(b_k.dtype), EXACT)
        store_rows(du, b_du, rows, valid, i_h, o_v, H, V)
        if USE_G:
            b_dh = b_dh * tl.exp(b_G)
        b_dh += dot(tl.trans(b_q.to(b_do.dtype)), b_do, EXACT) - dot(tl.trans(b_w), b_du.to(b_w.dtype), EXACT)
    if STORE_DH0:
        store_tile(dh0, b_dh, i_nh, p_kv, m_kv, K, V)


@triton.jit
def wy_bwd_kernel(k, v, beta, g, tinv, du, dw, dk, dv, dbeta, dg, cu_seqlens, chunk_indices,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, EXACT: tl.constexpr):
    """Gradients through u0 = Tinv (beta v), w = Tinv (beta exp(b) k): dv, this path's dk, dbeta and dlog-decay."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    n, rows, valid, _, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_t = tl.arange(0, BT)
    b_T = tl.load(tinv + (rows[:, None] * H + i_h) * BT + o_t[None, :], mask=valid[:, None], other=0.0)
    b_beta = tl.load(beta + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    if USE_G:
        b_b, _ = chunk_gates(g, rows, valid, i_h, H)
        b_eb = tl.exp(b_b)
    else:
        b_eb = tl.full([BT], 1.0, tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_v = load_rows(v, rows, valid, i_h, o_v, H, V).to(tl.float32)
        b_dX = dot(tl.trans(b_T), load_rows(du, rows, valid, i_h, o_v, H, V).to(tl.float32), EXACT)
        store_rows(dv, b_dX * b_beta[:, None], rows, valid, i_h, o_v, H, V)
        b_dbeta += tl.sum(b_dX * b_v, 1)
        b_u0 = dot(b_T, b_v * b_beta[:, None], EXACT)
        b_dA -= dot(b_dX, tl.trans(b_u0), EXACT)
    b_gram = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K).to(tl.float32)
        b_kb = b_k * (b_beta * b_eb)[:, None]
        b_dX = dot(tl.trans(b_T), load_rows(dw, rows, valid, i_h, o_k, H, K).to(tl.float32), EXACT)
        b_dA -= dot(b_dX, tl.trans(dot(b_T, b_kb, EXACT)), EXACT)
        b_dbeta += tl.sum(b_dX * b_k * b_eb[:, None], 1)
        b_db += tl.sum(b_dX * b_kb, 1)
        b_gram += dot(b_k, tl.trans(b_k), EXACT)
    strict = o_t[:, None] > o_t[None, :]
    if USE_G:
        b_E = tl.where(strict, tl.exp(tl.where(strict, b_b[:, None] - b_b[None, :], 0.0)), 0.0)
    else:
        b_E = tl.where(strict, 1.0, 0.0)
    b_dAE = b_dA * b_E  # d/d(k_i.k_j) / beta_i
    b_dbeta += tl.sum(b_dAE * b_gram, 1)
    b_dAA = b_dAE * b_gram * b_beta[:, None]  # dA * A
    b_db += tl.sum(b_dAA, 1) - tl.sum(b_dAA, 0)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_rows(k, rows, valid, i_h, o_k, H, K).to(tl.float32)
        b_dX = dot(tl.trans(b_T), load_rows(dw, rows, valid, i_h, o_k, H, K).to(tl.float32), EXACT)
        b_dk = b_dX * (b_beta * b_eb)[:, None]
        b_dk += dot(b_dAE, b_k, EXACT) * b_beta[:, None] + dot(tl.trans(b_dAE), b_k * b_beta[:, None], EXACT)
        store_rows(dk, b_dk, rows, valid, i_h, o_k, H, K)
    tl.store(dbeta + rows * H + i_h, b_dbeta, mask=valid)
    if USE_G:
        b_db = tl.where(valid, b_db, 0.0)
        tl.store(dg + rows * H + i_h, tl.sum(b_db, 0) - tl.cumsum(b_db, 0) + b_db, mask=valid)


@triton.jit
def step_kernel(q, k, v, beta, g, state, o, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                G_MODE: tl.constexpr):
    """One decode step for a whole batch, state updated in place (a program owns a [K, BV] slab)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = state + i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0)
    if G_MODE == 1:
        b_s = b_s * tl.exp(tl.load(g + i_bh % H).to(tl.float32))
    elif G_MODE == 2:
        b_s = b_s * tl.exp(tl.load(g + i_bh).to(tl.float32))
    b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_u = tl.load(beta + i_bh).to(tl.float32) * (b_v - tl.sum(b_k[:, None] * b_s, 0))
    b_s += b_k[:, None] * b_u[None, :]
    tl.store(p_s, b_s, mask=m_s)
    tl.store(o + i_bh * V + o_v, (tl.sum(b_q[:, None] * b_s, 0) * scale).to(o.dtype.element_ty), mask=m_v)


# -------------------------------------------------------------------------------------------------------
# host side

def _state_tile(kernel: str, K: int, V: int) -> tuple[int, int, int]:
    """The state passes hold all of K: a [BK, BV] fp32 slab, BV shrunk so that it stays <= 8192 values."""
    BK, BV, warps = launch(kernel, K, V)
    return BK, min(BV, max(16, 8192 // BK)), warps


def _wy_fwd(k, v, beta, g, vl, BT, exact):
    T_all, H, K = k.shape
    V = v.shape[2]
    tinv = k.new_empty(T_all, H, BT, dtype=torch.float32)
    w, u0 = torch.empty_like(k), torch.empty_like(v)
    BK, BV, warps = launch("delta.wy_fwd", K, V)
    wy_fwd_kernel[(vl.num_chunks, H)](k, v, beta, g, tinv, w, u0, vl.cu_seqlens, vl.chunk_indices, H=H, K=K, V=V,
                                      BT=BT, BK=BK, BV=BV, USE_G=g is not None, EXACT=exact, num_warps=warps)
    return tinv, w, u0


def _fwd_h(k, w, u0, g, h0, vl, BT, store_final, exact):
    _, H, K = k.shape
    V = u0.shape[2]
    BK, BV, warps = _state_tile("delta.fwd_h", K, V)
    h = k.new_empty(vl.num_chunks, H, K, V, dtype=torch.float32 if exact else k.dtype)
    vnew = torch.empty_like(u0)
    ht = k.new_empty(vl.num_seqs, H, K, V, dtype=torch.float32) if store_final else None
    fwd_h_kernel[(triton.cdiv(V, BV), vl.num_seqs * H)](
        k, w, u0, g, h, vnew, h0, ht, vl.cu_seqlens, vl.chunk_offsets, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=g is not None, USE_H0=h0 is not None, STORE_HT=store_final, EXACT=exact, num_warps=warps)
    return h, vnew, ht


class _ChunkDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, vl, BT, output_final_state):
        exact = exact_dots(q.dtype)
        _, w, u0 = _wy_fwd(k, v, beta, g, vl, BT, exact)
        h, vnew, ht = _fwd_h(k, w, u0, g, h0, vl, BT, output_final_state, exact)
        o = _fwd_o(q, k, vnew, g, h, vl, scale, BT, exact)
        ctx.save_for_backward(q, k, v, beta, g, h0)
        ctx.vl, ctx.scale, ctx.BT = vl, scale, BT
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0 = ctx.saved_tensors
        vl, scale, BT = ctx.vl, ctx.scale, ctx.BT
        exact = exact_dots(q.dtype)
        T_all, H, K = q.shape
        V = v.shape[2]
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        # recompute the forward's intermediates (cheaper in memory than keeping them)
        tinv, w, u0 = _wy_fwd(k, v, beta, g, vl, BT, exact)
        h, vnew, _ = _fwd_h(k, w, u0, g, h0, vl, BT, False, exact)
        dv_intra = _bwd_dv(q, k, g, do, None, vl, scale, BT, exact)
        BKs, BVs, warps = _state_tile("delta.bwd_dhu", K, V)
        dh = torch.empty_like(h)
        du = torch.empty_like(v, dtype=torch.float32 if exact else v.dtype)
        dh0 = q.new_empty(vl.num_seqs, H, K, V, dtype=torch.float32) if h0 is not None else None
        bwd_dhu_kernel[(triton.cdiv(V, BVs), vl.num_seqs * H)](
            q, k, w, g, do, dv_intra, dh, du, dht, dh0, vl.cu_seqlens, vl.chunk_offsets, scale, H=H, K=K, V=V,
            BT=BT, BK=BKs, BV=BVs, USE_G=g is not None, USE_DHT=dht is not None, STORE_DH0=h0 is not None,
            EXACT=exact, num_warps=warps)
        dq, dk, dg, dw = _bwd_dqk(q, k, vnew, g, h, do, dh, vl, scale, BT, exact, du=du)
        dk_wy, dv = torch.empty_like(k), torch.empty_like(v)
        dbeta = q.new_empty(T_all, H, dtype=torch.float32)
        dg_wy = q.new_empty(T_all, H, dtype=torch.float32) if g is not None else None
        BKw, BVw, warps = launch("delta.wy_bwd", K, V)
        wy_bwd_kernel[(vl.num_chunks, H)](
            k, v, beta, g, tinv, du, dw, dk_wy, dv, dbeta, dg_wy, vl.cu_seqlens, vl.chunk_indices, H=H, K=K, V=V,
            BT=BT, BK=BKw, BV=BVw, USE_G=g is not None, EXACT=exact, num_warps=warps)
        dk = (dk.float() + dk_wy.float()).to(k.dtype)
        dg = None if g is None else dg + dg_wy
        return dq, dk, dv, dbeta.to(beta.dtype), dg, dh0, None, None, None, None


def chunk_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                     chunk_size: int = 64, cu_seqlens=None):
    """Triton twin of ``reference.chunk_delta_rule`` (same arguments, same results)."""
    reference._check(q, k, v, initial_state if cu_seqlens is None else None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_K:
        raise ValueError(f"the Triton delta rule supports key dimensions up to {MAX_K}; got K={K}")
    BT = check_chunk_size(chunk_size)
    scale = K**-0.5 if scale is None else float(scale)
    vl = prepare_varlen(q, cu_seqlens, initial_state, V, BT)
    reference._expand_beta(beta, B, T, H)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    out_dtype = v.dtype
    q, k, v = common_dtype(q, k, v)
    o, ht = _ChunkDeltaRule.apply(flat(q), flat(k), flat(v), flat(beta), flat_log_decay(g, B, T, H), h0, scale, vl,
                                  BT, output_final_state)
    return o.view(B, T, H, V).to(out_dtype), ht


def delta_rule_step(q, k, v, beta, g, state, scale=None):
    """Fused decode step: updates ``state`` [B, H, K, V] in place (when it is contiguous fp32) and returns (o, state)."""
    B, H, K = q.shape
    V = v.shape[-1]
    if tuple(state.shape) != (B, H, K, V):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected {(B, H, K, V)}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        state = state.float().contiguous()  # a copy: updated and returned
    if K > MAX_K:
        raise ValueError(f"the Triton delta rule supports key dimensions up to {MAX_K}; got K={K}")
    scale = K**-0.5 if scale is None else float(scale)
    G_MODE = 0 if g is None else (1 if g.dim() == 1 else 2)
    g = None if g is None else g.float().contiguous()
    o = v.new_empty(B, H, V)
    BK, BV, warps = _state_tile("delta.step", K, V)
    step_kernel[(triton.cdiv(V, BV), B * H)](q.contiguous(), k.contiguous(), v.contiguous(), beta.float().contiguous(),
                                             g, state, o, scale, H=H, K=K, V=V, BK=BK, BV=BV, G_MODE=G_MODE,
                                             num_warps=warps)
    return o, state
