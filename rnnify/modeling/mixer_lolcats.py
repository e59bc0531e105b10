"""LoLCATs-style attention: the sliding window + sinks softmax with Hedgehog linear attention as its memory.

Only torch and sibling files are imported: this file ships with converted models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .mixer_base import STATE_BYTES, kernels
from .mixer_window import Evicted, WindowMixer


class HedgehogFeatureMap(nn.Module):
    """Hedgehog feature map (Zhang et al. 2024, "The Hedgehog & the Porcupine", eq. 6; LoLCATs sec. 3.1):
    phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))], one W_h per head, initialised to the identity."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, head_dim))
        self.bias = nn.Parameter(torch.empty(num_heads, head_dim))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[-1]).expand_as(self.weight))
            self.bias.zero_()

    def forward(self, x):  # [B, T, H, D] -> [B, T, H, 2D]
        # computed in fp32 whatever the weights' dtype (queries arrive in fp32, keys in the model's dtype)
        z = torch.einsum("bthd,hde->bthe", x.float(), self.weight.float()) + self.bias.float()
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


class LolcatsMixer(WindowMixer):
    """LoLCATs-style attention (Zhang et al. 2024, "LoLCATs", eq. 6): a softmax over the last ``window``
    tokens plus ``sinks`` first tokens, and Hedgehog linear attention over every older token:

        y_t = (a_sm sum_{s in win(t)} e^{q.k_s/sqrt(d) - m_t} v_s + a_ln phi(q_t)^T S_t)
              / (a_sm sum_{s in win(t)} e^{q.k_s/sqrt(d) - m_t}     + a_ln phi(q_t)^T z_t)

    with a_ln = sigmoid(linear_mix_logit_h) and a_sm = 1 - a_ln per head; S_t, z_t sum phi(k_s) v_s^T and
    phi(k_s) over s in [sinks, t - window]: the tokens that left the window. The mixing logit starts at -6
    (a_ln = 0.0025), so the untrained conversion is close to the window-only model (see DESIGN.md's calibration run).

    ``memory_halflife`` (our addition; off in the paper) gives the memory a learned per-head decay, as in GLA /
    RetNet: S_t = gamma_h S_{t-1} + phi(k_{t-W}) v_{t-W}^T (z_t likewise), so a token that left the window j steps
    ago weighs gamma_h^j. Without it the memory's share of the attention grows with the number of evicted tokens,
    and a memory fitted at one length over-weights old tokens at longer ones. gamma_h = exp(-exp(r_h)) with r_h
    starting at log(ln 2 / halflife).
    """

    name = "lolcats"
    state_expansion = "merge_heads"
    SETTINGS = {"chunk_size": 64, "init_linear_mix_logit": -6.0, "merge_heads": False, "memory_halflife": None}
    layer_type = "hybrid_sliding_sink"

    def __init__(self, config, layer_idx, attn, settings):
        super().__init__(config, layer_idx, attn, settings)
        self.chunk_size = int(self.setting("chunk_size"))
        self.init_mix_logit = float(self.setting("init_linear_mix_logit"))
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim)
        self.feature_map_k = HedgehogFeatureMap(self.num_heads, self.head_dim)
        self.linear_mix_logit = nn.Parameter(torch.full((self.num_heads,), self.init_mix_logit))
        self.merged = bool(self.setting("merge_heads"))  # StateX: the linear branch as one big head
        halflife = self.setting("memory_halflife")
        self.decay_log_rate = None
        if halflife is not None:
            if self.merged:
                raise ValueError("memory_halflife decays each head's memory; merge_heads (StateX) keeps one memory")
            if float(halflife) <= 0:
                raise ValueError(f"memory_halflife must be a positive number of tokens, got {halflife!r}")
            self.init_log_rate = math.log(math.log(2.0) / float(halflife))
            self.decay_log_rate = nn.Parameter(torch.full((self.num_heads,), self.init_log_rate))

    def init_new_parameters(self):
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()
        with torch.no_grad():
            self.linear_mix_logit.fill_(self.init_mix_logit)
            if self.decay_log_rate is not None:
                self.decay_log_rate.fill_(self.init_log_rate)

    def memory_state_bytes(self):
        H, D = self.num_heads, self.head_dim
        if self.merged:  # one head: H x 2D features x (H x D values + one normaliser)
            return 2 * H * D * (H * D + 1) * STATE_BYTES
        return H * 2 * D * (D + 1) * STATE_BYTES  # Hedgehog features (2D) x (values + normaliser) per head

    def memory(self, hidden_states, q, evicted: Evicted, state):
        """Linear attention over the evicted tokens; returns phi(q)^T [S | z] per head ([B, T, H, D + 1])."""
        B, T, H, D = q.shape
        fk = self.feature_map_k(self.repeat_kv(evicted.k))
        ok = evicted.ok.to(fk.dtype)[..., None, None]
        fk = fk * ok
        v_lin = self.repeat_kv(evicted.v)
        v1 = torch.cat([v_lin, torch.ones_like(v_lin[..., :1])], -1) * ok  # last column: normaliser z
        fk, v1 = evicted.align(fk), evicted.align(v1)
        fq = self.feature_map_q(q)
        # per-head log-decay (every position decays the memory, whether or not a token leaves the window there)
        g = None if self.decay_log_rate is None else -torch.exp(self.decay_log_rate.float())
        if self.merged:  # StateX: one head over every head's features and values, one shared normaliser
            n = fk.shape[1]
            fq, fk = fq.reshape(B, T, 1, -1), fk.reshape(B, n, 1, -1)
            v1 = torch.cat([v1[..., :D].reshape(B, n, 1, -1), v1[..., :1, D:]], -1)
        if T == 1 and state is not None:
            o, new_state = kernels.linear_attention_step(fq[:, 0], fk[:, 0], v1[:, 0], g, state, scale=1.0)
            o = o.unsqueeze(1)
        else:
            o, new_state = kernels.chunk_linear_attention(fq, fk, v1, g=g, scale=1.0, initial_state=state,
                                                  output_final_state=True, chunk_size=self.chunk_size)
        if self.merged:  # back to [B, T, H, D + 1]: each head's values with the shared normaliser
            o = torch.cat([o[..., : H * D].reshape(B, T, H, D), o[..., H * D :].expand(B, T, H, 1)], -1)
        return o, new_state

    def combine(self, num, den, memory_out):
        D = self.head_dim
        a_ln = torch.sigmoid(self.linear_mix_logit.float())[None, None, :, None]
        a_sm = 1.0 - a_ln
        return (a_sm * num + a_ln * memory_out[..., :D]) / (a_sm * den + a_ln * memory_out[..., D:]).clamp_min(1e-12)


__all__ = ["HedgehogFeatureMap", "LolcatsMixer"]
