"""Mamba2 mixer initialised from attention (Mamba-in-the-Llama). Only torch and sibling files are imported: this
file ships with converted models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_base import STATE_BYTES, Mixer, kernels, padding_mask_for


class GatedRMSNorm(nn.Module):
    """Mamba2's gated RMSNorm, per head: y = RMSNorm_group(y * silu(z)) * w (norm after the gate)."""

    def __init__(self, hidden: int, group: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.group, self.eps = group, eps

    def forward(self, y, z):
        dtype = y.dtype
        y = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y.flatten(-2) * self.weight.float()).to(dtype)


class Mamba2Mixer(Mixer):
    """Mamba2 mixer initialised from attention (Wang et al. 2024, "The Mamba in the Llama", sec. 2-3).

    in_proj gives [z, x, B, C, dt]; a causal depthwise conv (+SiLU) runs over [x, B, C]; per head h the SSD
    recurrence (Dao & Gu 2024, eq. 1 with scalar A_h):

        S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T,   y_t = C_t^T S_t + D_h x_t

    is exactly scalar-decay linear attention with q=C, k=B, v=dt*x and log-decay dt*A, so it runs on the same
    chunked / step ops. Then a gated per-head RMSNorm with z, and out_proj. As in the paper: x <- V, B <- K,
    C <- Q, out_proj <- O (d_state = head_dim at conversion; x and B have the KV heads and are repeated for GQA);
    z, dt, A, D, conv and norm are fresh (Mamba2's defaults). q_norm/k_norm of families that have them act on C/B.
    The ``d_state`` setting unties the state size from the head size (StateX multiplies it).

    ``init: attention`` (our addition, for small budgets) starts the fresh parts where the untrained mixer reads the
    attention's own q/k/v as decayed linear attention, as the Gated DeltaNet student does: the conv the identity,
    D = 0, dt's rows of in_proj zero (dt = softplus(dt_bias), Mamba2's draw), and the gate open: z's rows zero with
    an in_proj bias where silu(z) = 1. Under Mamba2's init the gate silu(z) of a random z is ~z/2, a random-sign
    mask over every channel, and D x, the token's own value, outweighs the dt-scaled (~0.01) state read.
    """

    name = "mamba2"
    state_expansion = "d_state"
    # d_state: the head dim (x <- V, B <- K, C <- Q); norm_eps: the source's rms_norm_eps
    SETTINGS = {"d_state": None, "conv_kernel": 4, "chunk_size": 64, "conv_init": "default", "norm_eps": None,
                "init": "paper"}
    layer_type = "linear_attention"
    adopts = ("q_norm", "k_norm")  # act on C / B
    absorbs = ("q_proj", "k_proj", "v_proj", "o_proj")  # copied into in_proj / out_proj by init_from_attention

    def __init__(self, config, layer_idx, attn, settings):
        super().__init__(config, layer_idx, attn, settings)
        base = config.base_config
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.d_state = N = int(self.setting("d_state") or D)
        self.d_inner, self.d_xb = H * D, Hkv * D
        self.d_b, self.d_c = Hkv * N, H * N  # B per KV head (repeated for GQA), C per head
        self.conv_kernel = int(self.setting("conv_kernel"))
        self.chunk_size = int(self.setting("chunk_size"))
        self.conv_init = self.setting("conv_init")
        if self.conv_init not in ("default", "identity"):
            raise ValueError(f"conv_init {self.conv_init!r}; accepted: default, identity")
        self.init = self.setting("init")
        if self.init not in ("paper", "attention"):
            raise ValueError(f"init {self.init!r}; accepted: paper, attention")
        # the open gate needs a bias on z's rows (the other rows' stay zero where the attention has none)
        bias = self.init == "attention" or getattr(attn, "q_proj", None) is not None and attn.q_proj.bias is not None
        hidden = base.hidden_size
        self.in_proj = nn.Linear(hidden, self.d_inner + self.d_xb + self.d_b + self.d_c + H, bias=bias)
        conv_dim = self.d_xb + self.d_b + self.d_c
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.conv_kernel, groups=conv_dim, padding=self.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        # the source's RMSNorm epsilon unless set (Llama-3's 1e-5 is what the paper's Mamba2 uses)
        eps = float(self.setting("norm_eps") or getattr(base, "rms_norm_eps", 1e-5))
        self.norm = GatedRMSNorm(self.d_inner, D, eps=eps)
        o_bias = getattr(attn, "o_proj", None) is not None and attn.o_proj.bias is not None
        self.out_proj = nn.Linear(self.d_inner, hidden, bias=o_bias)

    def _split(self):
        return [self.d_inner, self.d_xb, self.d_b, self.d_c, self.num_heads]  # z, x, B, C, dt

    def init_new_parameters(self):
        """Mamba2's own initialisation for the fresh parts (deterministic per layer, so runs are reproducible)."""
        g = torch.Generator().manual_seed(1000 + self.source_layer)
        H = self.num_heads
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_proj.in_features)
            self.in_proj.weight.uniform_(-bound, bound, generator=g)
            if self.in_proj.bias is not None:
                self.in_proj.bias.zero_()
            if self.conv_init == "identity" or self.init == "attention":  # pass-through conv
                self.conv1d.weight.zero_()
                self.conv1d.weight[..., -1] = 1.0
                self.conv1d.bias.zero_()
            else:
                cb = 1 / math.sqrt(self.conv_kernel)
                self.conv1d.weight.uniform_(-cb, cb, generator=g)
                self.conv1d.bias.uniform_(-cb, cb, generator=g)
            # dt ~ log-uniform in [1e-3, 1e-1], stored through the inverse of softplus; A ~ U[1, 16]
            dt = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(H).uniform_(1, 16, generator=g)))
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)
            bound = 1 / math.sqrt(self.out_proj.in_features)
            self.out_proj.weight.uniform_(-bound, bound, generator=g)
            if self.init == "attention":
                z, x, b, c, _ = self._split()
                self.D.zero_()
                self.in_proj.weight[:z].zero_()
                self.in_proj.weight[z + x + b + c :].zero_()  # dt's rows: dt = softplus(dt_bias) to start
                self.in_proj.bias[:z].fill_(_SILU_ONE)

    def init_from_attention(self, attn):
        """The paper's initialisation: rows of in_proj from V, K, Q; out_proj from O."""
        if self.d_state != self.head_dim:
            raise ValueError(f"B <- K and C <- Q need d_state == head_dim ({self.head_dim}), got {self.d_state}")
        z, x, b, c, _ = self._split()
        with torch.no_grad():
            w = self.in_proj.weight
            w[z : z + x].copy_(attn.v_proj.weight)
            w[z + x : z + x + b].copy_(attn.k_proj.weight)
            w[z + x + b : z + x + b + c].copy_(attn.q_proj.weight)
            if self.in_proj.bias is not None:
                for rows, proj in ((slice(z, z + x), attn.v_proj), (slice(z + x, z + x + b), attn.k_proj),
                                   (slice(z + x + b, z + x + b + c), attn.q_proj)):
                    if proj.bias is not None:
                        self.in_proj.bias[rows].copy_(proj.bias)
            self.out_proj.weight.copy_(attn.o_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(attn.o_proj.bias)

    def cache_bytes(self, seq_len, batch=1, kv_bytes=2):
        conv = (self.d_xb + self.d_b + self.d_c) * (self.conv_kernel - 1) * kv_bytes
        return batch * (conv + self.num_heads * self.d_state * self.head_dim * STATE_BYTES)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        Bsz, T, _ = hidden_states.shape
        H, Hkv, D, N = self.num_heads, self.num_kv_heads, self.head_dim, self.d_state
        z, xBC, dt = torch.split(self.in_proj(hidden_states), [self.d_inner, self.d_xb + self.d_b + self.d_c, H], -1)
        valid = padding_mask_for(attention_mask, T)
        if valid is not None:  # padded tokens feed neither the conv nor the state
            xBC = xBC * valid[..., None].to(xBC.dtype)

        layer = self.cache_layer(kwargs)
        conv_state = layer.conv_states[0] if layer is not None and layer.has_previous_state[0] else None
        ssm_state = layer.recurrent_states[0] if layer is not None and layer.is_recurrent_states_initialized[0] else None
        weight = self.conv1d.weight.squeeze(1)
        if T == 1 and conv_state is not None:
            # the step returns the slid window (a fused kernel slides the cached one in place)
            y1, new_conv = kernels.causal_conv1d_step(xBC[:, 0], weight, self.conv1d.bias, conv_state)
            conv_state.copy_(new_conv)
            xBC_act = y1.unsqueeze(1)
        else:
            xBC_act, _ = kernels.causal_conv1d(xBC, weight, self.conv1d.bias, conv_state)
            if layer is not None:
                layer.update_conv_state(xBC.transpose(1, 2), 0, conv_kernel_size=self.conv_kernel - 1)

        x, Bm, C = torch.split(xBC_act, [self.d_xb, self.d_b, self.d_c], -1)
        x = self.repeat_kv(x.view(Bsz, T, Hkv, D))
        Bm = Bm.view(Bsz, T, Hkv, N)
        C = C.view(Bsz, T, H, N)
        if getattr(self, "q_norm", None) is not None:
            C, Bm = self.q_norm(C), self.k_norm(Bm)
        Bm = self.repeat_kv(Bm)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        if valid is not None:
            dt = dt * valid[..., None]
        g = dt * -torch.exp(self.A_log.float())  # log-decay dt * A, A < 0
        v = x.float() * dt[..., None]
        if T == 1 and ssm_state is not None:
            y, new_state = kernels.linear_attention_step(C[:, 0], Bm[:, 0], v[:, 0], g[:, 0], ssm_state, scale=1.0)
            y = y.unsqueeze(1)
        else:
            y, new_state = kernels.chunk_linear_attention(C, Bm, v, g=g, scale=1.0, initial_state=ssm_state,
                                                  output_final_state=layer is not None, chunk_size=self.chunk_size)
        if layer is not None:
            layer.update_recurrent_state(new_state, 0)
        y = y + self.D.float()[None, None, :, None] * x.float()
        y = self.norm(y.reshape(Bsz, T, -1), z)
        return self.out_proj(y.to(hidden_states.dtype)), None


_SILU_ONE = 1.2784645  # silu(x) = 1: the open gate


__all__ = ["GatedRMSNorm", "Mamba2Mixer"]
