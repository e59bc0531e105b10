"""Pieces shared by the Triton kernels: packed-sequence bookkeeping, block sizes and a dot that is exact
where it must be."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import reference


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run in numpy on the CPU: the CI test mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def exact_dots(dtype: torch.dtype) -> bool:
    """fp32 inputs get IEEE fp32 dots (not TF32) so they match the reference closely. The interpreter always
    takes this path because it computes bf16 dots wrongly (numpy has no bf16)."""
    return dtype == torch.float32 or interpreting()


# Launch shapes per kernel: (num_warps, cap on BK, cap on BV). Chosen without a GPU so that ptxas reports no
# register spills on sm_90a for D = 128 in bf16 (``python -m rnnify.kernels.fused.aot`` prints the table; with
# 4 warps and 64-wide tiles most chunk kernels spilled 300-1800 bytes). Not yet tuned for speed on a GPU.
LAUNCH = {
    "la.fwd_h": (8, 64, 64), "la.fwd_o": (8, 64, 64), "la.bwd_dh": (8, 64, 64), "la.bwd_dv": (8, 64, 64),
    "la.bwd_dqk": (8, 32, 32), "la.step": (4, 128, 32),
    "delta.wy_fwd": (8, 32, 32), "delta.fwd_h": (8, 256, 16), "delta.bwd_dhu": (8, 256, 32),
    "delta.wy_bwd": (8, 32, 32), "delta.step": (4, 256, 32),
    "conv.fwd": (4, 0, 0), "conv.bwd_dp": (8, 0, 0), "conv.bwd_dx": (4, 0, 0), "conv.step": (4, 0, 0),
}


def launch(kernel: str, K: int = 16, V: int = 16) -> tuple[int, int, int]:
    """(BK, BV, num_warps) for ``kernel`` at head dims K, V (one warp in the interpreter: it is faster)."""
    warps, cap_k, cap_v = LAUNCH[kernel]
    return (block(K, cap_k) if cap_k else 0, block(V, cap_v) if cap_v else 0, 1 if interpreting() else warps)


@triton.jit
def dot(a, b, EXACT: tl.constexpr):
    """a @ b with fp32 accumulation; EXACT upcasts both sides and asks for IEEE fp32."""
    if EXACT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def dot_fp32(a, b, EXACT: tl.constexpr):
    """fp32 a @ b at fp32 accuracy: IEEE where exact, else TF32x3 (three TF32 tensor-core passes)."""
    if EXACT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def chunk_rows(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """Rows of global chunk ``i_c``: (sequence n, row indices, row-is-real mask, number of real rows, the
    sequence's first row)."""
    n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    rows, valid = seq_chunk(bos, eos, t, BT)
    return n, rows, valid, tl.minimum(eos - bos - t * BT, BT), bos


@triton.jit
def seq_bounds(cu_seqlens, chunk_offsets, i_nh, H: tl.constexpr):
    """For the state passes (one program per sequence and head): (head, first row, end row, first chunk)."""
    n = i_nh // H
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    return i_nh % H, bos, eos, tl.load(chunk_offsets + n).to(tl.int64)


@triton.jit
def chunk_gates(g, rows, valid, i_h, H: tl.constexpr):
    """Within-chunk cumulative log-decay b (fp32, [BT]) and its total over the chunk."""
    b_g = tl.load(g + rows * H + i_h, mask=valid, other=0.0).to(tl.float32)
    return tl.cumsum(b_g, 0), tl.sum(b_g, 0)


@triton.jit
def load_rows(x, rows, valid, i_h, o_d, H: tl.constexpr, D: tl.constexpr):
    """The [rows, o_d] tile of head i_h of a [T_all, H, D] tensor; zeros past the sequence end or past D."""
    return tl.load(x + (rows[:, None] * H + i_h) * D + o_d[None, :], mask=valid[:, None] & (o_d[None, :] < D),
                   other=0.0)


@triton.jit
def store_rows(x, value, rows, valid, i_h, o_d, H: tl.constexpr, D: tl.constexpr):
    tl.store(x + (rows[:, None] * H + i_h) * D + o_d[None, :], value.to(x.dtype.element_ty),
             mask=valid[:, None] & (o_d[None, :] < D))


@triton.jit
def state_tile(i_k, i_v, BK: tl.constexpr, BV: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Offsets and mask of the [BK, BV] tile (i_k, i_v) inside a [K, V] state."""
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return o_k, o_v, o_k[:, None] * V + o_v[None, :], (o_k[:, None] < K) & (o_v[None, :] < V)


@triton.jit
def initial_tile(h0, i_nh, p_kv, m_kv, BK: tl.constexpr, BV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 USE: tl.constexpr):
    """fp32 [BK, BV] tile of state i_nh of a [N*H, K, V] tensor (zeros when USE is False)."""
    b = tl.zeros([BK, BV], dtype=tl.float32)
    if USE:
        b += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    return b


@triton.jit
def store_tile(h, b, index, p_kv, m_kv, K: tl.constexpr, V: tl.constexpr):
    """Store a tile into state ``index`` (chunk * H + head, or sequence * H + head) of a [.., K, V] tensor."""
    tl.store(h + index.to(tl.int64) * K * V + p_kv, b.to(h.dtype.element_ty), mask=m_kv)


@triton.jit
def seq_chunk(bos, eos, t, BT: tl.constexpr):
    """Rows of chunk t of the sequence [bos, eos) and which of them are real."""
    rows = bos + t * BT + tl.arange(0, BT)
    return rows, rows < eos


class Varlen:
    """Sequences of a (possibly packed) batch and their chunks. Fixed-length ``[B, T]`` batches are treated
    as ``B`` packed sequences of length ``T``, so every kernel has one code path."""

    def __init__(self, cu_seqlens: torch.Tensor, chunk_indices: torch.Tensor, chunk_offsets: torch.Tensor, lengths):
        self.cu_seqlens, self.chunk_indices, self.chunk_offsets = cu_seqlens, chunk_indices, chunk_offsets
        self.lengths = lengths
        self.num_seqs = len(lengths)
        self.num_chunks = int(chunk_indices.shape[0])


@functools.lru_cache(maxsize=64)
def _varlen(lengths: tuple, BT: int, device: torch.device) -> Varlen:
    cu, idx, offs = [0], [], [0]
    for n, L in enumerate(lengths):
        cu.append(cu[-1] + L)
        nt = -(-L // BT)
        idx.extend((n, t) for t in range(nt))
        offs.append(offs[-1] + nt)
    as_t = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return Varlen(as_t(cu), as_t(idx).view(-1, 2), as_t(offs), lengths)


def prepare_varlen(q: torch.Tensor, cu_seqlens, initial_state, V: int, BT: int) -> Varlen:
    B, T, H, K = q.shape
    if cu_seqlens is None:
        lengths = (T,) * B
    else:
        cu = reference._check_cu_seqlens(cu_seqlens, B, T, initial_state, H, K, V)
        lengths = tuple(b - a for a, b in zip(cu, cu[1:]))
    return _varlen(lengths, BT, q.device)


def check_chunk_size(chunk_size: int) -> int:
    """The chunk size is a tiling choice (results do not depend on it beyond rounding): the kernels take the
    nearest power of two in [16, 128] (16 is tl.dot's minimum tile)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    return max(16, min(128, triton.next_power_of_2(chunk_size)))


def block(d: int, cap: int = 64) -> int:
    """Tile size for a head dimension: a power of two >= 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(d)))


def flat(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> contiguous [B*T, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def flat_log_decay(g, B: int, T: int, H: int):
    """None, [H] or [B, T, H] -> None or contiguous fp32 [B*T, H] (autograd reduces an expanded [H])."""
    if g is None:
        return None
    return flat(reference._expand_log_decay(g, B, T, H, g.device))


def common_dtype(*xs: torch.Tensor):
    """q, k, v in one dtype (the widest): tl.dot needs both sides alike. Mamba2 passes bf16 C/B with fp32 dt*x."""
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return [x.to(dt) for x in xs]
