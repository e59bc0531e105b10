"""Plain-PyTorch recurrences: the ground truth for every fused kernel, and the CPU fallback.

Two families: linear attention with a per-head scalar decay, and the (gated) delta rule.

Calling convention (shared with the Triton kernels): q, k are ``[B, T, H, K]``, v is ``[B, T, H, V]``,
the state is ``[B, H, K, V]`` in fp32, and the decay is given as a log-decay ``g`` (<= 0) that is either
``None`` (no decay), a ``[H]`` tensor (constant per head: SUPRA / RetNet) or ``[B, T, H]`` (data-dependent:
Mamba2 / simple GLA).

The recurrences (Yang et al. 2024, "Gated Linear Attention", eq. 1 with a scalar gate; Yang et al. 2025,
"Gated Delta Networks", eq. 10):

    linear attention:  S_t = exp(g_t) S_{t-1} + k_t v_t^T                                o_t = scale * S_t^T q_t
    gated delta rule:  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T  o_t = scale * S_t^T q_t

Packed variable-length batches: pass ``cu_seqlens`` (cumulative lengths ``[N+1]``, as in flash-attn) with
``B == 1``; states are then ``[N, H, K, V]``, one per sequence.

This file only imports torch: it is copied next to converted models so that they load with
``trust_remote_code=True`` where rnnify is not installed.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def _expand_log_decay(g: torch.Tensor | None, B: int, T: int, H: int, device) -> torch.Tensor:
    """Return the log-decay as a ``[B, T, H]`` fp32 tensor."""
    if g is None:
        return torch.zeros(B, T, H, device=device, dtype=torch.float32)
    g = g.float()
    if g.dim() == 1:
        if g.shape[0] != H:
            raise ValueError(f"per-head log-decay has {g.shape[0]} entries, expected H={H}")
        return g.view(1, 1, H).expand(B, T, H)
    if g.shape != (B, T, H):
        raise ValueError(f"log-decay has shape {tuple(g.shape)}, expected [H]={H} or [B, T, H]={(B, T, H)}")
    return g


def _empty(v, B, H, K, V, initial_state, output_final_state):
    """What the chunked forms return for T = 0: an empty output and the initial state (zeros without one)."""
    state = v.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    return v.new_zeros(B, 0, H, V), (state if output_final_state else None)


def _check(q, k, v, initial_state) -> tuple[int, int, int, int, int]:
    """Validate the shapes; return (B, T, H, K, V)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k as [B, T, H, K] and v as [B, T, H, V]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, K, V)}")
    return B, T, H, K, V


def naive_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
    """Quadratic reference: materialises the full decay-weighted T x T score matrix."""
    B, T, H, K, _ = _check(q, k, v, initial_state)
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    b = _expand_log_decay(g, B, T, H, q.device).cumsum(1)  # [B, T, H] inclusive cumulative log-decay
    b = b.transpose(1, 2)  # [B, H, T]
    diff = b.unsqueeze(-1) - b.unsqueeze(-2)  # b_i - b_j
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bihk,bjhk->bhij", q, k) * decay
    o = torch.einsum("bhij,bjhv->bihv", scores, v)
    if initial_state is not None:
        o = o + torch.einsum("bihk,bhkv->bihv", q * b.transpose(1, 2).exp().unsqueeze(-1), initial_state.float())
    final = None
    if output_final_state:
        w = torch.exp(b[..., -1:] - b).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
        final = torch.einsum("bthk,bthv->bhkv", k * w, v)
        if initial_state is not None:
            final = final + b[..., -1].exp()[..., None, None] * initial_state.float()
    return (o * scale).to(dtype), final


def recurrent_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Token-by-token recurrence (the definition). Slow; used by tests and as the decode reference."""
    if cu_seqlens is not None:
        return _per_sequence(recurrent_linear_attention, cu_seqlens, (q, k, v), {"g": g},
                             initial_state, output_final_state, scale=scale)
    B, T, H, K, V = _check(q, k, v, initial_state)
    scale = K**-0.5 if scale is None else scale
    gl = _expand_log_decay(g, B, T, H, q.device)
    state = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float().clone()
    outs = []
    for t in range(T):
        o, state = linear_attention_step(q[:, t], k[:, t], v[:, t], gl[:, t], state, scale=scale)
        outs.append(o)
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
    return o, (state if output_final_state else None)


def linear_attention_step(q, k, v, g, state, scale=None):
    """One decode step. q, k: [B, H, K]; v: [B, H, V]; g: None, [H] or [B, H]; state: [B, H, K, V] fp32.

    Returns (o [B, H, V] in v's dtype, new state). The new state is a new tensor (the caller's cache copies it in).
    """
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    state = state.float()
    if g is not None:
        g = g.float()
        decay = g.exp().view(1, -1, 1, 1) if g.dim() == 1 else g.exp()[..., None, None]
        state = state * decay
    state = state + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q.float(), state) * scale
    return o.to(v.dtype), state


def chunk_linear_attention(
    q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, chunk_size: int = 64, cu_seqlens=None
):
    """Chunked parallel form: exact attention inside each chunk, a state passed between chunks.

    Any length works (the tail chunk is zero-padded; padded steps have k = v = 0 and g = 0, so they change
    neither the outputs of real tokens nor the final state). Work is vectorised over chunks; only the
    inter-chunk state scan loops, once per chunk.
    """
    if cu_seqlens is not None:
        return _per_sequence(chunk_linear_attention, cu_seqlens, (q, k, v), {"g": g},
                             initial_state, output_final_state, scale=scale, chunk_size=chunk_size)
    B, T, H, K, V = _check(q, k, v, initial_state)
    if T == 0:  # an empty (packed) sequence: no output, the state passes through
        return _empty(v, B, H, K, V, initial_state, output_final_state)
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    C = chunk_size
    gl = None if g is None else _expand_log_decay(g, B, T, H, q.device)
    pad = (-T) % C
    q, k, v = q.float(), k.float(), v.float()
    if pad:
        q = F.pad(q, (0, 0, 0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
        gl = None if gl is None else F.pad(gl, (0, 0, 0, pad))
    N = (T + pad) // C
    # [B, H, N, C, D]
    q = q.view(B, N, C, H, K).permute(0, 3, 1, 2, 4)
    k = k.view(B, N, C, H, K).permute(0, 3, 1, 2, 4)
    v = v.view(B, N, C, H, V).permute(0, 3, 1, 2, 4)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:  # no decay (LoLCATs/Hedgehog): skip every decay factor
        o = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0) @ v
        chunk_states = k.transpose(-1, -2) @ v  # [B, H, N, K, V]
        chunk_decay = None
        q_in = q
    else:
        b = gl.view(B, N, C, H).permute(0, 3, 1, 2).cumsum(-1)  # [B, H, N, C] within-chunk cumulative log-decay
        b_last = b[..., -1:]  # [B, H, N, 1]
        # intra-chunk: o_i = sum_{j<=i} exp(b_i - b_j) (q_i . k_j) v_j   (all exponents <= 0: no overflow)
        decay = torch.exp((b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
        o = (q @ k.transpose(-1, -2) * decay) @ v
        # each chunk's own contribution to the state at its end: sum_j exp(b_C - b_j) k_j v_j^T
        k_to_end = k * torch.exp(b_last - b).unsqueeze(-1)
        chunk_states = k_to_end.transpose(-1, -2) @ v  # [B, H, N, K, V]
        chunk_decay = b_last.squeeze(-1).exp()  # [B, H, N]
        q_in = q * b.exp().unsqueeze(-1)

    # scan: state entering chunk n
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    entering = []
    for n in range(N):
        entering.append(state)
        state = state + chunk_states[:, :, n] if chunk_decay is None else \
            chunk_decay[:, :, n, None, None] * state + chunk_states[:, :, n]
    entering = torch.stack(entering, 2)  # [B, H, N, K, V]

    # inter-chunk: exp(b_i) q_i^T S_entering
    o = o + q_in @ entering
    o = (o * scale).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(dtype), (state if output_final_state else None)


def causal_conv1d(x, weight, bias=None, initial_state=None, activation: str | None = "silu", cu_seqlens=None):
    """Depthwise causal convolution (Mamba's conv1d). x: [B, T, C]; weight: [C, K]; bias: [C];
    initial_state: [B, C, K-1], the K-1 inputs before x (zeros when None). Returns (y [B, T, C], final state
    [B, C, K-1]: the last K-1 inputs, for the next call). With ``cu_seqlens`` (B == 1), no sequence sees
    another's inputs and the states are per sequence ``[N, C, K-1]``."""
    if cu_seqlens is not None:
        cu = [int(c) for c in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
        if x.shape[0] != 1 or len(cu) < 2 or cu[0] != 0 or cu[-1] != x.shape[1]:
            raise ValueError(f"cu_seqlens must rise from 0 to T={x.shape[1]} with B == 1; got B={x.shape[0]}, {cu}")
        parts = [causal_conv1d(x[:, a:b], weight, bias, None if initial_state is None else initial_state[n:n + 1],
                               activation) for n, (a, b) in enumerate(zip(cu, cu[1:]))]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0)
    B, T, C = x.shape
    K = weight.shape[-1]
    prev = x.new_zeros(B, C, K - 1) if initial_state is None else initial_state.to(x.dtype)
    if T == 0:  # an empty (packed) sequence: no output, the state passes through
        return x.new_zeros(B, 0, C), prev
    full = torch.cat([prev, x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    y = F.conv1d(full, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=C)
    y = y.transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"activation {activation!r}; accepted: silu, None")
    return y, full[..., full.shape[-1] - (K - 1):]


def causal_conv1d_step(x, weight, bias, state, activation: str | None = "silu"):
    """One decode step of ``causal_conv1d``: x [B, C], state [B, C, K-1] -> (y [B, C], new state)."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation == "silu":
        y = F.silu(y)
    return y, window[..., 1:]


# ---------------------------------------------------------------------------------------------------------
# packed variable-length batches

def _check_cu_seqlens(cu_seqlens, B: int, T: int, initial_state, H: int, K: int, V: int) -> list[int]:
    if B != 1:
        raise ValueError(f"cu_seqlens needs the packed sequences in one row (B == 1); got B={B}")
    cu = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} (one entry per sequence boundary); got {cu}")
    N = len(cu) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected one state per sequence {(N, H, K, V)}")
    return cu


def _per_sequence(fn, cu_seqlens, tensors, per_token, initial_state, output_final_state, **kw):
    """Run ``fn`` on each packed sequence of ``tensors`` ([1, T, ...]) and of the ``per_token`` ones (g, beta
    when [1, T, H]); concatenate the outputs and stack the final states."""
    q, _, v = tensors[:3]
    cu = _check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], initial_state, q.shape[2], q.shape[3], v.shape[3])
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        args = [t[:, a:b] for t in tensors]
        extra = {name: (t[:, a:b] if t is not None and t.dim() == 3 else t) for name, t in per_token.items()}
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, ht = fn(*args, **extra, initial_state=h0, output_final_state=True, **kw)
        outs.append(o)
        finals.append(ht)
    o = torch.cat(outs, 1)
    return o, (torch.cat(finals, 0) if output_final_state else None)


# ---------------------------------------------------------------------------------------------------------
# gated delta rule (DeltaNet when g is None)

def _expand_beta(beta: torch.Tensor, B: int, T: int, H: int) -> torch.Tensor:
    if beta.shape != (B, T, H):
        raise ValueError(f"beta has shape {tuple(beta.shape)}, expected [B, T, H]={(B, T, H)}")
    return beta.float()


def delta_rule_step(q, k, v, beta, g, state, scale=None):
    """One decode step. q, k: [B, H, K]; v: [B, H, V]; beta: [B, H]; g: None, [H] or [B, H]; state [B, H, K, V].

    Returns (o [B, H, V] in v's dtype, new state)."""
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    state = state.float()
    if g is not None:
        g = g.float()
        state = state * (g.exp().view(1, -1, 1, 1) if g.dim() == 1 else g.exp()[..., None, None])
    k32 = k.float()
    # beta_t (v_t - S^T k_t): the part of v_t the (decayed) state does not already predict
    u = beta.float().unsqueeze(-1) * (v.float() - torch.einsum("bhk,bhkv->bhv", k32, state))
    state = state + k32.unsqueeze(-1) * u.unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q.float(), state) * scale
    return o.to(v.dtype), state


def recurrent_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Token-by-token gated delta rule (the definition)."""
    if cu_seqlens is not None:
        return _per_sequence(recurrent_delta_rule, cu_seqlens, (q, k, v), {"beta": beta, "g": g},
                             initial_state, output_final_state, scale=scale)
    B, T, H, K, V = _check(q, k, v, initial_state)
    beta = _expand_beta(beta, B, T, H)
    gl = None if g is None else _expand_log_decay(g, B, T, H, q.device)
    state = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float().clone()
    outs = []
    for t in range(T):
        o, state = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], None if gl is None else gl[:, t], state, scale)
        outs.append(o)
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
    return o, (state if output_final_state else None)


def chunk_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                     chunk_size: int = 64, cu_seqlens=None):
    """Chunked gated delta rule via the WY / UT-transform form (Yang et al. 2024, "Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length", sec. 3; gated form from Gated DeltaNet sec. 3.3).

    Inside a chunk with cumulative log-decay b and entering state S, the corrected values are
    U = T^{-1} (beta * v) - T^{-1} (beta * exp(b) * k) S with T = I + strict_tril(beta_i exp(b_i - b_j) k_i.k_j),
    after which the chunk is ordinary decayed linear attention with values U.
    """
    if cu_seqlens is not None:
        return _per_sequence(chunk_delta_rule, cu_seqlens, (q, k, v), {"beta": beta, "g": g},
                             initial_state, output_final_state, scale=scale, chunk_size=chunk_size)
    B, T, H, K, V = _check(q, k, v, initial_state)
    if T == 0:  # an empty (packed) sequence: no output, the state passes through
        return _empty(v, B, H, K, V, initial_state, output_final_state)
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    C = chunk_size
    beta = _expand_beta(beta, B, T, H)
    gl = _expand_log_decay(g, B, T, H, q.device)
    pad = (-T) % C
    q, k, v = q.float(), k.float(), v.float()
    if pad:  # padded steps: k = v = beta = g = 0, a no-op on the state
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta, gl = F.pad(beta, (0, 0, 0, pad)), F.pad(gl, (0, 0, 0, pad))
    N = (T + pad) // C
    q, k, v = (x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))  # [B, H, N, C, D]
    beta = beta.view(B, N, C, H).permute(0, 3, 1, 2)
    b = gl.view(B, N, C, H).permute(0, 3, 1, 2).cumsum(-1)  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A = (beta.unsqueeze(-1) * decay * (k @ k.transpose(-1, -2))).masked_fill(~strict, 0.0)
    eye = torch.eye(C, device=q.device)
    T_mat = A + eye
    u0 = torch.linalg.solve_triangular(T_mat, beta.unsqueeze(-1) * v, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(T_mat, (beta * b.exp()).unsqueeze(-1) * k, upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay
    k_to_end = k * torch.exp(b[..., -1:] - b).unsqueeze(-1)
    q_in = q * b.exp().unsqueeze(-1)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outs = []
    for n in range(N):
        U = u0[:, :, n] - w[:, :, n] @ state
        outs.append(q_in[:, :, n] @ state + attn[:, :, n] @ U)
        state = b[:, :, n, -1].exp()[..., None, None] * state + k_to_end[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outs, 2) * scale  # [B, H, N, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(dtype), (state if output_final_state else None)


# The shipped copy of this file is imported by a converted model's mixer_base.py as ``from .kernels_reference import
# this_module``: transformers copies the files that relative from-imports name, and a plain ``from . import`` is not one.
this_module = sys.modules[__name__]
