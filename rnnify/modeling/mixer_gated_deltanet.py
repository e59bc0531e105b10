"""Gated DeltaNet mixer initialised from attention. Only torch and sibling files are imported: this file ships with
converted models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_base import STATE_BYTES, Mixer, gated_log_decay, kernels, l2_normalize, padding_mask_for


class GatedDeltaNetMixer(Mixer):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks", eq. 10) in place of an attention layer:

        S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T,    o_t = S_t^T q_t

    with q, k L2-normalised per head (and q scaled by 1/sqrt(D)), write strength beta_t = sigmoid(b_proj x_t) and
    decay a_t = exp(-exp(A_log) softplus(a_proj x_t + dt_bias)) per head (Mamba2's parametrisation, as the paper).

    From the attention it replaces (the hybrid-distillation / RADLADS students do the same): q, k, v, o projections
    kept as they are (k/v heads repeated for GQA at run time, as the anchors repeat their weights); no RoPE (the
    recurrence orders tokens). New, each started so that step 0 is that linear-attention reading of the attention:
    a depthwise causal conv over [q, k, v] (width ``conv_kernel``, 0 for none) that starts as the identity (last tap
    1), beta's projection with zero weights and a bias giving ``beta_init``, the decay's projection with zero weights
    and Mamba2's A / dt draw (per-head time constants from ~1 to ~10^4 tokens), and, with ``output_gate``, the
    paper's per-head RMSNorm of o times silu(g_proj x) with g_proj zero and a bias where silu is 1.
    ``merge_heads`` (StateX): the heads form one head of H x D keys and values (per-head gates averaged).
    """

    name = "gated_deltanet"
    layer_type = "linear_attention"  # transformers' cache layer with conv_states and recurrent_states
    state_expansion = "merge_heads"
    # norm_eps: the source's rms_norm_eps
    SETTINGS = {"chunk_size": 64, "conv_kernel": 4, "output_gate": True, "beta_init": 0.5, "norm_eps": None,
                "merge_heads": False}

    def __init__(self, config, layer_idx, attn, settings):
        super().__init__(config, layer_idx, attn, settings)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        hidden = config.base_config.hidden_size
        self.chunk_size = int(self.setting("chunk_size"))
        self.conv_kernel = int(self.setting("conv_kernel"))
        self.merged = bool(self.setting("merge_heads"))
        self.output_gate = bool(self.setting("output_gate"))
        beta = float(self.setting("beta_init"))
        if not 0 < beta < 1:
            raise ValueError(f"beta_init {beta}: accepted: a write strength in (0, 1)")
        if self.conv_kernel == 1 or self.conv_kernel < 0:
            raise ValueError(f"conv_kernel {self.conv_kernel}: accepted: 0 (no convolution) or a width >= 2")
        self.qkv_dim = (H + 2 * Hkv) * D
        if self.conv_kernel:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, self.conv_kernel, groups=self.qkv_dim, bias=False,
                                    padding=self.conv_kernel - 1)
        self.b_proj = nn.Linear(hidden, H, bias=True)
        self.a_proj = nn.Linear(hidden, H, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        if self.output_gate:
            self.g_proj = nn.Linear(hidden, H * D, bias=True)
            self.o_norm_weight = nn.Parameter(torch.ones(D))
            self.eps = float(self.setting("norm_eps") or getattr(config.base_config, "rms_norm_eps", 1e-6))

    def init_new_parameters(self):
        """Deterministic per layer: the draws of A and dt depend on the layer, not on what ran before."""
        g = torch.Generator().manual_seed(2000 + self.source_layer)
        H = self.num_heads
        with torch.no_grad():
            if self.conv_kernel:
                self.conv1d.weight.zero_()
                self.conv1d.weight[..., -1] = 1.0
            self.b_proj.weight.zero_()
            beta = float(self.setting("beta_init"))
            self.b_proj.bias.fill_(math.log(beta / (1 - beta)))
            self.a_proj.weight.zero_()
            # Mamba2's draw (as Gated DeltaNet and fla): dt log-uniform in [1e-3, 1e-1] through the inverse softplus,
            # A uniform in [1, 16]; the per-token decay exp(-A dt) then keeps a token for ~1 to ~10^4 steps
            dt = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(H).uniform_(1, 16, generator=g)))
            if self.output_gate:
                self.g_proj.weight.zero_()
                self.g_proj.bias.fill_(_SILU_ONE)
                self.o_norm_weight.fill_(1.0)

    def cache_bytes(self, seq_len, batch=1, kv_bytes=2):
        H, D = self.num_heads, self.head_dim
        conv = self.qkv_dim * max(self.conv_kernel - 1, 0) * kv_bytes
        state = (H * D) ** 2 if self.merged else H * D * D
        return batch * (conv + state * STATE_BYTES)

    def mixing_flops(self, context: int) -> float:
        H, D = self.num_heads, self.head_dim
        state = (H * D) ** 2 if self.merged else H * D * D
        return 4.0 * state  # the state read and written once (the conv's taps are weights: counted with them)

    def log_decay(self, decay_logits):
        """Each head's log decay per token from a_proj's output: -exp(A_log) softplus(a_proj x + dt_bias). Float32."""
        return gated_log_decay(self.A_log, self.dt_bias, decay_logits)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        valid = padding_mask_for(attention_mask, T)
        if valid is not None:  # padded tokens feed neither the conv nor the state
            qkv = qkv * valid[..., None].to(qkv.dtype)
        layer = self.cache_layer(kwargs)
        if self.conv_kernel:
            qkv = self._conv(qkv, layer, T)
        q, k, v = torch.split(qkv, [H * D, Hkv * D, Hkv * D], -1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if getattr(self, "q_norm", None) is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = l2_normalize(q.float()) * D**-0.5, l2_normalize(k.float())
        k, v = self.repeat_kv(k), self.repeat_kv(v.float())
        beta = torch.sigmoid(self.b_proj(hidden_states).float())  # [B, T, H]
        g = self.log_decay(self.a_proj(hidden_states))
        if valid is not None:  # padding writes nothing and does not decay the state
            beta, g = beta * valid[..., None], g * valid[..., None]
        if self.merged:  # one head of H x D keys and values; the gates are the heads' mean (StateX, sec. 3.1)
            q, v = q.reshape(B, T, 1, -1), v.reshape(B, T, 1, -1)
            k = l2_normalize(k.reshape(B, T, 1, -1))
            beta, g = beta.mean(-1, keepdim=True), g.mean(-1, keepdim=True)

        state = layer.recurrent_states[0] if layer is not None and layer.is_recurrent_states_initialized[0] else None
        if T == 1 and state is not None:
            o, new_state = kernels.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], state, scale=1.0)
            o = o.unsqueeze(1)
        else:
            o, new_state = kernels.chunk_delta_rule(q, k, v, beta, g=g, scale=1.0, initial_state=state,
                                                    output_final_state=layer is not None, chunk_size=self.chunk_size)
        if layer is not None:
            layer.update_recurrent_state(new_state, 0)
        o = o.float().reshape(B, T, H, D)
        if self.output_gate:  # per-head RMSNorm, then the gate (Gated DeltaNet's output block)
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.o_norm_weight.float()
            o = o * F.silu(self.g_proj(hidden_states).float()).view(B, T, H, D)
        return self.o_proj(o.reshape(B, T, H * D).to(hidden_states.dtype)), None

    def _conv(self, qkv, layer, T):
        """The depthwise causal conv over [q, k, v], through the cache's conv slot when decoding."""
        weight = self.conv1d.weight.squeeze(1)
        conv_state = layer.conv_states[0] if layer is not None and layer.has_previous_state[0] else None
        if T == 1 and conv_state is not None:
            y, new_conv = kernels.causal_conv1d_step(qkv[:, 0], weight, None, conv_state, activation=None)
            conv_state.copy_(new_conv)
            return y.unsqueeze(1)
        y, _ = kernels.causal_conv1d(qkv, weight, None, conv_state, activation=None)
        if layer is not None:
            layer.update_conv_state(qkv.transpose(1, 2), 0, conv_kernel_size=self.conv_kernel - 1)
        return y


_SILU_ONE = 1.2784645  # silu(x) = 1: the output gate starts open at exactly one


__all__ = ["GatedDeltaNetMixer"]
