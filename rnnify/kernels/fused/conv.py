"""Depthwise causal short convolution (Mamba2's conv1d, width W <= 8) forward, backward and decode step.

y_t = act(bias + sum_w weight[:, w] * x_{t - (W-1-w)}), where inputs before a sequence's start come from its
``initial_state`` (the W-1 inputs that preceded it) or are zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import chunk_rows, interpreting, launch, prepare_varlen

BT_CONV = 64
ACTIVATIONS = (None, "silu")


@triton.jit
def _shifted_input(x, state, n, rows, valid, bos, o_c, m_c, shift, C: tl.constexpr, W: tl.constexpr,
                   USE_STATE: tl.constexpr):
    """x_{t - shift} for the rows t of a block (fp32); rows before the sequence start read its state."""
    src = rows - shift
    inside = src >= bos
    b_x = tl.load(x + src[:, None] * C + o_c[None, :], mask=(valid & inside)[:, None] & m_c[None, :], other=0.0)
    b_x = b_x.to(tl.float32)
    if USE_STATE:  # column (src - bos) + W - 1 of the sequence's state
        col = src - bos + (W - 1)
        b_x += tl.load(state + (n * C + o_c[None, :]) * (W - 1) + col[:, None],
                       mask=(valid & (~inside))[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    return b_x


@triton.jit
def _pre_activation(x, weight, bias, state, n, rows, valid, bos, o_c, m_c,
                    C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    USE_BIAS: tl.constexpr, USE_STATE: tl.constexpr):
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if USE_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    for w in tl.static_range(W):
        b_x = _shifted_input(x, state, n, rows, valid, bos, o_c, m_c, W - 1 - w, C, W, USE_STATE)
        acc += b_x * tl.load(weight + o_c * W + w, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def fwd_kernel(x, weight, bias, state, y, cu_seqlens, chunk_indices,
               C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
               USE_BIAS: tl.constexpr, USE_STATE: tl.constexpr, SILU: tl.constexpr):
    i_cb, i_c = tl.program_id(0), tl.program_id(1)
    n, rows, valid, _, bos = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_c = i_cb * BC + tl.arange(0, BC)
    m_c = o_c < C
    acc = _pre_activation(x, weight, bias, state, n, rows, valid, bos, o_c, m_c, C, W, BT, BC, USE_BIAS, USE_STATE)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + rows[:, None] * C + o_c[None, :], acc.to(y.dtype.element_ty), mask=valid[:, None] & m_c[None, :])


@triton.jit
def bwd_dp_kernel(x, weight, bias, state, dy, dp, dweight, cu_seqlens, chunk_indices,
                  C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  USE_BIAS: tl.constexpr, USE_STATE: tl.constexpr, SILU: tl.constexpr):
    """Gradient at the pre-activation (dp) and this chunk's share of the weight gradient."""
    i_cb, i_c = tl.program_id(0), tl.program_id(1)
    n, rows, valid, _, bos = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    o_c = i_cb * BC + tl.arange(0, BC)
    m_c = o_c < C
    m = valid[:, None] & m_c[None, :]
    b_dp = tl.load(dy + rows[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    if SILU:  # silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
        acc = _pre_activation(x, weight, bias, state, n, rows, valid, bos, o_c, m_c, C, W, BT, BC, USE_BIAS, USE_STATE)
        s = tl.sigmoid(acc)
        b_dp = b_dp * s * (1 + acc * (1 - s))
    tl.store(dp + rows[:, None] * C + o_c[None, :], b_dp, mask=m)
    for w in tl.static_range(W):
        b_x = _shifted_input(x, state, n, rows, valid, bos, o_c, m_c, W - 1 - w, C, W, USE_STATE)
        tl.store(dweight + (i_c * C + o_c) * W + w, tl.sum(b_x * b_dp, 0), mask=m_c)


@triton.jit
def bwd_dx_kernel(dp, weight, dx, cu_seqlens, chunk_indices,
                  C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx_s = sum_w weight[:, w] dp_{s + W-1-w} over outputs inside the same sequence."""
    i_cb, i_c = tl.program_id(0), tl.program_id(1)
    n, rows, valid, _, _ = chunk_rows(cu_seqlens, chunk_indices, i_c, BT)
    seq_end = tl.load(cu_seqlens + n + 1).to(tl.int64)
    o_c = i_cb * BC + tl.arange(0, BC)
    m_c = o_c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for w in tl.static_range(W):
        dst = rows + (W - 1 - w)
        b_dp = tl.load(dp + dst[:, None] * C + o_c[None, :], mask=(valid & (dst < seq_end))[:, None] & m_c[None, :], other=0.0)
        acc += b_dp * tl.load(weight + o_c * W + w, mask=m_c, other=0.0).to(tl.float32)[None, :]
    tl.store(dx + rows[:, None] * C + o_c[None, :], acc.to(dx.dtype.element_ty), mask=valid[:, None] & m_c[None, :])


@triton.jit
def step_kernel(x, weight, bias, state, y, C: tl.constexpr, W: tl.constexpr, BC: tl.constexpr,
                USE_BIAS: tl.constexpr, SILU: tl.constexpr):
    """One decode step: y = act(bias + window . weight); the window slides by one in place."""
    i_cb, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    o_c = i_cb * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_s = state + (i_b * C + o_c) * (W - 1)
    b_x = tl.load(x + i_b * C + o_c, mask=m_c, other=0.0).to(tl.float32)
    acc = b_x * tl.load(weight + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)
    if USE_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    prev = tl.load(p_s, mask=m_c, other=0.0)
    for j in tl.static_range(W - 1):
        acc += prev.to(tl.float32) * tl.load(weight + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
        if j < W - 2:
            nxt = tl.load(p_s + j + 1, mask=m_c, other=0.0)
            tl.store(p_s + j, nxt, mask=m_c)
            prev = nxt
    tl.store(p_s + (W - 2), b_x.to(state.dtype.element_ty), mask=m_c)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + i_b * C + o_c, acc.to(y.dtype.element_ty), mask=m_c)


def _check(x, weight, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; accepted: silu, None")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1] or not 2 <= weight.shape[1] <= 8:
        raise ValueError(f"weight must be [C, W] with C={x.shape[-1]} and 2 <= W <= 8; got {tuple(weight.shape)}")


def _final_state(x, initial_state, vl, W):
    """The last W-1 inputs of every sequence (reaching into its initial state when it is shorter)."""
    cu = vl.cu_seqlens.long()
    bos, eos = cu[:-1], cu[1:]
    src = eos[:, None] - (W - 1) + torch.arange(W - 1, device=x.device)  # [N, W-1]
    inside = src >= bos[:, None]
    out = x[src.clamp(min=0)].permute(0, 2, 1)  # [N, C, W-1]
    before = x.new_zeros(out.shape) if initial_state is None else \
        initial_state.to(x.dtype).gather(2, (src - bos[:, None] + W - 1).clamp(0, W - 2)[:, None, :].expand_as(out))
    return torch.where(inside[:, None, :], out, before)


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, vl, silu):
        T_all, C = x.shape
        W = weight.shape[1]
        BC = min(64, triton.next_power_of_2(C))
        y = torch.empty_like(x)
        fwd_kernel[(triton.cdiv(C, BC), vl.num_chunks)](
            x, weight, bias, state, y, vl.cu_seqlens, vl.chunk_indices, C=C, W=W, BT=BT_CONV, BC=BC,
            USE_BIAS=bias is not None, USE_STATE=state is not None, SILU=silu, num_warps=launch("conv.fwd")[2])
        ctx.save_for_backward(x, weight, bias, state)
        ctx.vl, ctx.silu = vl, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, state = ctx.saved_tensors
        vl = ctx.vl
        T_all, C = x.shape
        W = weight.shape[1]
        BC = min(64, triton.next_power_of_2(C))
        grid = (triton.cdiv(C, BC), vl.num_chunks)
        dp = x.new_empty(T_all, C, dtype=torch.float32)
        dweight = x.new_zeros(vl.num_chunks, C, W, dtype=torch.float32)
        common = dict(C=C, W=W, BT=BT_CONV, BC=BC)
        bwd_dp_kernel[grid](x, weight, bias, state, dy.contiguous(), dp, dweight, vl.cu_seqlens, vl.chunk_indices,
                            USE_BIAS=bias is not None, USE_STATE=state is not None, SILU=ctx.silu,
                            num_warps=launch("conv.bwd_dp")[2], **common)
        dx = torch.empty_like(x)
        bwd_dx_kernel[grid](dp, weight, dx, vl.cu_seqlens, vl.chunk_indices, num_warps=launch("conv.bwd_dx")[2], **common)
        dbias = dp.sum(0).to(bias.dtype) if bias is not None else None
        dstate = None
        if state is not None:  # state column j feeds output bos + j - w through weight[:, w]  (tiny: done here)
            cu = vl.cu_seqlens.long()
            dstate = torch.zeros_like(state, dtype=torch.float32)
            for j in range(W - 1):
                for w in range(j + 1):
                    r = cu[:-1] + j - w
                    ok = (r < cu[1:]).float()[:, None]
                    dstate[:, :, j] += dp[r.clamp(max=T_all - 1)] * ok * weight[:, w].float()
            dstate = dstate.to(state.dtype)
        return dx, dweight.sum(0).to(weight.dtype), dbias, dstate, None, None


def causal_conv1d(x, weight, bias=None, initial_state=None, activation="silu", cu_seqlens=None):
    """Triton twin of ``reference.causal_conv1d`` (same arguments, same results)."""
    _check(x, weight, activation)
    B, T, C = x.shape
    W = weight.shape[1]
    vl = prepare_varlen(x.unsqueeze(-1), cu_seqlens, None, 1, BT_CONV)
    if initial_state is not None and tuple(initial_state.shape) != (vl.num_seqs, C, W - 1):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {(vl.num_seqs, C, W - 1)}")
    xf = x.reshape(B * T, C).contiguous()
    state = None if initial_state is None else initial_state.contiguous()
    y = _CausalConv1d.apply(xf, weight.contiguous(), None if bias is None else bias.contiguous(), state, vl,
                            activation == "silu")
    final = _final_state(xf, state, vl, W)  # gathers in torch: autograd follows them, as in the reference
    return y.view(B, T, C), final


def causal_conv1d_step(x, weight, bias, state, activation="silu"):
    """Fused decode step: slides ``state`` [B, C, W-1] in place (when contiguous) and returns (y, state)."""
    _check(x, weight, activation)
    B, C = x.shape
    W = weight.shape[1]
    if tuple(state.shape) != (B, C, W - 1):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected {(B, C, W - 1)}")
    if not state.is_contiguous():
        state = state.contiguous()  # a copy: updated and returned
    BC = min(256 if not interpreting() else 64, triton.next_power_of_2(C))
    y = torch.empty_like(x)
    step_kernel[(triton.cdiv(C, BC), B)](x.contiguous(), weight.contiguous(), bias, state, y, C=C, W=W, BC=BC,
                                         USE_BIAS=bias is not None, SILU=activation == "silu",
                                         num_warps=launch("conv.step")[2])
    return y, state
