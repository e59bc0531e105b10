"""AHN: the sliding window + sinks softmax with an RNN memory of the tokens that leave the window.

Artificial Hippocampus Networks (Fang et al. 2025, arXiv 2510.07318, sec. 3): each converted layer keeps its own
exact softmax attention over the sinks and the last ``window`` tokens (``WindowMixer``); a token that leaves the
window is written into a fixed-size recurrent memory, which every later query reads. Per head h (one memory head per
query head, an H x D x D state per layer):

    write (token s leaving the window, never a sink):  k_s, v_s as the layer computed them (RoPE on k, KV heads
        repeated to query heads); gates from that token's normalised hidden state x_s (the decoder layer's input norm)
    read (query t):  q_t after RoPE
    gated_deltanet:  S <- a_s S + b_s k_s (v_s - a_s S^T k_s)^T,   a_s = exp(-exp(A_log) softplus(w_a.x_s + dt_bias)),
                     b_s = sigmoid(w_b.x_s); q, k L2-normalised (Yang et al. 2025, "Gated Delta Networks", eq. 10)
    deltanet:        the same without decay (a_s = 1)
    mamba2:          S <- exp(dt_s A) S + k_s (dt_s v_s)^T, dt_s = softplus(w_dt.x_s + dt_bias), A = -exp(A_log),
                     A_log = log(1..H), no D skip: x = v, B = k, C = q (Dao & Gu 2024, eq. 1)
    output:          m_t = O_h ( sigmoid(w_g.x_t) * RMSNorm(S^T q_t) ),   O_h (D x D per head) starts at zero
    band_gains:      (our addition, off by default) q and k scaled per head and per rotary pair, q_i <- gq_i q_i,
                     k_i <- gk_i k_i, both started at 1: a gain on a (i, i + D/2) pair commutes with its rotation, so
                     q.k stays a function of the distance, but the memory can weigh the slowly turning pairs (content
                     over thousands of tokens) above the fast ones (whose sign is noise far beyond the window)

and ``m_t`` is added to the window attention's output per head before ``o_proj``: the untrained model IS the
window-only model. ``merge_heads`` (StateX, Shen et al. 2025) makes the memory one head of H x D keys and values
(an H-fold larger state, no new parameters): the heads' write gates are averaged, the read is split back per head.
The write gates' logits are computed when a token enters the window and kept in the cache with its key and value
(``carry``), so decoding needs nothing that grows with the context.

Only torch and sibling files are imported: this file ships with converted models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_base import STATE_BYTES, gated_log_decay, kernels, l2_normalize
from .mixer_window import Evicted, WindowMixer

MEMORIES = ("gated_deltanet", "deltanet", "mamba2")
_WRITE_GATES = {"gated_deltanet": 2, "deltanet": 1, "mamba2": 1}  # per head: (beta, decay) / beta / dt


class AhnMixer(WindowMixer):
    name = "ahn"
    state_expansion = "merge_heads"
    # the window the AHN paper trains with (~256), over WindowMixer's 64
    SETTINGS = {"window": 256, "memory": "gated_deltanet", "chunk_size": 64, "norm_eps": 1e-6, "merge_heads": False,
                "band_gains": False}
    layer_type = "hybrid_sliding_sink"

    def __init__(self, config, layer_idx, attn, settings):
        super().__init__(config, layer_idx, attn, settings)
        self.memory_kind = str(self.setting("memory"))
        if self.memory_kind not in MEMORIES:
            raise ValueError(f"AHN memory {self.memory_kind!r}; accepted: {', '.join(MEMORIES)}")
        self.chunk_size = int(self.setting("chunk_size"))
        self.norm_eps = float(self.setting("norm_eps"))
        self.merged = bool(self.setting("merge_heads"))
        H, D, d = self.num_heads, self.head_dim, self.hidden_size
        self.carry_width = _WRITE_GATES[self.memory_kind] * H
        self.write_gates = nn.Linear(d, self.carry_width)  # from the leaving token's normalised hidden state
        self.read_gate = nn.Linear(d, H)  # per-head scalar gate from the current token
        if self.memory_kind != "deltanet":
            self.A_log = nn.Parameter(torch.zeros(H))
            self.dt_bias = nn.Parameter(torch.zeros(H))
        self.norm_weight = nn.Parameter(torch.ones(D))
        self.out_heads = nn.Parameter(torch.zeros(H, D, D))  # per-head output projection, zero at conversion
        if self.setting("band_gains"):
            if D % 2:
                raise ValueError(f"band_gains needs an even head_dim (rotary pairs); this model's is {D}")
            self.band_gains = nn.Parameter(torch.ones(2, H, D // 2))  # [q, k] per head and rotary pair

    def init_new_parameters(self):
        """Fresh gates (small normal weights; deterministic per layer), the decays as in the memories' own papers,
        and the zero output projection that makes the untrained model the window-only model."""
        g = torch.Generator().manual_seed(3000 + self.source_layer)
        H = self.num_heads
        with torch.no_grad():
            for lin in (self.write_gates, self.read_gate):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
                lin.bias.zero_()
            if self.memory_kind == "gated_deltanet":  # A ~ U[1, 16], dt ~ log-uniform [1e-3, 1e-1] (GDN / Mamba2)
                self.A_log.copy_(torch.log(torch.empty(H).uniform_(1, 16, generator=g)))
            elif self.memory_kind == "mamba2":  # A_h = -h (the AHN setting: A_log = log(1..H))
                self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
            if self.memory_kind != "deltanet":
                lo, hi = math.log(1e-3), math.log(1e-1)
                dt = torch.exp(torch.rand(H, generator=g) * (hi - lo) + lo).clamp_min(1e-4)
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.norm_weight.fill_(1.0)
            self.out_heads.zero_()
            if hasattr(self, "band_gains"):
                self.band_gains.fill_(1.0)

    def memory_state_bytes(self):
        H, D = self.num_heads, self.head_dim
        return (H * D) ** 2 * STATE_BYTES if self.merged else H * D * D * STATE_BYTES

    def carry(self, hidden_states):
        return self.write_gates(hidden_states)  # gate logits, kept with the token while it sits in the window

    def log_decay(self, decay_logits):
        """Each head's log decay per token from its gate logits, -exp(A_log) softplus(logit + dt_bias) (the gated
        delta rule's a_t in log space; Mamba2's dt A). Float32, the shape of ``decay_logits`` ([..., H])."""
        return gated_log_decay(self.A_log, self.dt_bias, decay_logits)

    def memory(self, hidden_states, q, evicted: Evicted, state):
        B, T, H, D = q.shape
        ok = evicted.ok.float()[..., None]  # [B, n, 1]: a real token leaves (not a sink, not padding)
        k = self.repeat_kv(evicted.k) * ok[..., None]
        v = self.repeat_kv(evicted.v)
        gates = evicted.carry.float()
        if hasattr(self, "band_gains"):  # a pair's two halves (i, i + D/2; rotate_half's layout) share one gain
            gq, gk = self.band_gains.repeat(1, 1, 2)
            q, k = q * gq.to(q.dtype), k * gk.to(k.dtype)  # the dtypes the kernels get without gains
        heads = (lambda x: x.mean(-1, keepdim=True)) if self.merged else (lambda x: x)  # per-head gates -> one
        if self.merged:
            q, k, v = (t.flatten(2).unsqueeze(2) for t in (q, k, v))  # [B, n, 1, H*D] (n may be 0)
        if self.memory_kind == "mamba2":
            dt = F.softplus(gates + self.dt_bias.float()) * ok  # [B, n, H]
            g, dt = heads(-torch.exp(self.A_log.float()) * dt), heads(dt)  # log decay dt A (dt already computed)
            v = v * dt[..., None]
            g, k, v = evicted.align(g), evicted.align(k), evicted.align(v)
            if T == 1 and state is not None:
                o, state = kernels.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state, scale=1.0)
                o = o.unsqueeze(1)
            else:
                o, state = kernels.chunk_linear_attention(q, k, v, g=g, scale=1.0, initial_state=state, output_final_state=True,
                                                  chunk_size=self.chunk_size)
        else:
            k, qn = l2_normalize(k), l2_normalize(q)
            beta = heads(torch.sigmoid(gates[..., :H])) * ok
            g = None
            if self.memory_kind == "gated_deltanet":
                g = evicted.align(heads(self.log_decay(gates[..., H:])) * ok)
            beta, k, v = evicted.align(beta), evicted.align(k), evicted.align(v)
            if T == 1 and state is not None:
                o, state = kernels.delta_rule_step(qn[:, 0], k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0],
                                           state)
                o = o.unsqueeze(1)
            else:
                o, state = kernels.chunk_delta_rule(qn, k, v, beta, g=g, initial_state=state, output_final_state=True,
                                            chunk_size=self.chunk_size)
        o = o.float().reshape(B, T, H, D)  # a merged head's read, split back per head
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight.float()
        o = o * torch.sigmoid(self.read_gate(hidden_states).float())[..., None]
        return torch.einsum("bthd,hde->bthe", o, self.out_heads.float()), state

    def combine(self, num, den, memory_out):
        return num / den + memory_out


__all__ = ["MEMORIES", "AhnMixer"]
