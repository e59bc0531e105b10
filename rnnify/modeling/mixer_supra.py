"""SUPRA linear attention (Mercat et al. 2024). Only torch and sibling files are imported: this file ships with
converted models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_base import STATE_BYTES, Mixer, apply_rope, kernels, padding_mask_for


class SupraMixer(Mixer):
    """SUPRA (Mercat et al. 2024, "Linearizing Large Language Models", sec. 3).

    o_t = GroupNorm( sum_{s<=t} gamma_h^{t-s} <rope(phi(q_t)), rope(phi(k_s))> v_s ),  phi(x) = ReLU(W x + b)

    The feature map is shared across heads (one for queries, one for keys), RoPE is applied after it, the
    decay gamma_h is fixed per head (RetNet's 1 - 2^{-5-h}, Sun et al. 2023 eq. 8, with the exponents spread
    over [5, 12] when there are more than 8 heads), and a per-head GroupNorm replaces the softmax denominator.

    ``merge_heads`` (StateX, Shen et al. 2025, sec. 3.1): the H heads form one head with keys and values of H x D
    (the feature map and RoPE still act per D-chunk, KV heads repeated first), so the state grows H-fold with no new
    parameters: one decay (the mean of the heads' log-decays unless given) and one normalisation group.
    """

    name = "supra"
    state_expansion = "merge_heads"
    SETTINGS = {"chunk_size": 64, "merge_heads": False, "norm_eps": 1e-5, "merged_log_decay": None}
    layer_type = "linear_attention"

    def __init__(self, config, layer_idx, attn, settings):
        super().__init__(config, layer_idx, attn, settings)
        D, H = self.head_dim, self.num_heads
        if D % 2:
            raise ValueError(f"SUPRA applies RoPE after the feature map and needs an even head_dim, got {D}")
        self.chunk_size = int(self.setting("chunk_size"))
        self.merged = bool(self.setting("merge_heads"))
        self.feature_map_q = nn.Linear(D, D)
        self.feature_map_k = nn.Linear(D, D)
        self.norm = nn.GroupNorm(1 if self.merged else H, H * D, eps=float(self.setting("norm_eps")))
        self.register_buffer("log_decay", self.initial_log_decay())

    @staticmethod
    def default_log_decay(num_heads: int) -> torch.Tensor:
        if num_heads <= 8:
            exponents = 5.0 + torch.arange(num_heads, dtype=torch.float64)
        else:
            exponents = torch.linspace(5.0, 12.0, num_heads, dtype=torch.float64)
        return torch.log1p(-(2.0**-exponents)).float()

    def init_new_parameters(self):
        # Identity feature maps: before training phi(q).phi(k) is the positive part of the source's q.k.
        with torch.no_grad():
            for fm in (self.feature_map_q, self.feature_map_k):
                fm.weight.copy_(torch.eye(self.head_dim))
                fm.bias.zero_()
            self.norm.weight.fill_(1.0)
            self.norm.bias.zero_()
            self.log_decay.copy_(self.initial_log_decay())

    def initial_log_decay(self) -> torch.Tensor:
        per_head = self.default_log_decay(self.num_heads)
        if not self.merged:
            return per_head
        given = self.setting("merged_log_decay")
        return per_head.mean(0, keepdim=True) if given is None else torch.tensor([float(given)])

    def cache_bytes(self, seq_len, batch=1, kv_bytes=2):
        H, D = self.num_heads, self.head_dim
        return batch * (H * D) ** 2 * STATE_BYTES if self.merged else batch * H * D * D * STATE_BYTES

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states)
        cos, sin = position_embeddings
        q = apply_rope(F.relu(self.feature_map_q(q)), cos, sin)
        k = apply_rope(F.relu(self.feature_map_k(k)), cos, sin)
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        valid = padding_mask_for(attention_mask, T)
        if valid is not None:  # padded tokens write nothing into the state
            k = k * valid[..., None, None].to(k.dtype)
            v = v * valid[..., None, None].to(v.dtype)

        if self.merged:  # one head of H x D keys and values
            q, k, v = (t.reshape(B, T, 1, -1) for t in (q, k, v))
        layer = self.cache_layer(kwargs)
        state = layer.recurrent_states[0] if layer is not None and layer.is_recurrent_states_initialized[0] else None
        if T == 1 and state is not None:
            o, new_state = kernels.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], self.log_decay, state,
                                                         scale=self.head_dim**-0.5)
            o = o.unsqueeze(1)
        else:
            o, new_state = kernels.chunk_linear_attention(
                q, k, v, g=self.log_decay, scale=self.head_dim**-0.5, initial_state=state,
                output_final_state=layer is not None, chunk_size=self.chunk_size,
            )
        if layer is not None:
            layer.update_recurrent_state(new_state, 0)

        o = self.norm(o.reshape(B * T, -1)).view(B, T, -1)
        return self.o_proj(o.to(hidden_states.dtype)), None


__all__ = ["SupraMixer"]
