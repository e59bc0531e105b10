"""Token mixers that replace a source attention layer, and their registry.

Every mixer adopts the source attention's projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and
``q_norm``/``k_norm`` where the family has them) under the same names, so a converted checkpoint shares
its parameter names with the source model and only the new parts are new. Each mixer has a parallel
(chunked) form for prompts and training and a recurrent form for decoding; both read and write the
fixed-size state in the transformers cache layer of their ``layer_idx``.

Only torch/transformers are imported at module level (this file ships with converted models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sink_window_cache import SinkWindowLinearLayer

try:  # fused kernels when rnnify is installed
    from rnnify.kernels import causal_conv1d, causal_conv1d_step, chunk_linear_attention, linear_attention_step
except ImportError:  # a converted model loaded with trust_remote_code where rnnify is not installed
    from .kernels_reference import causal_conv1d, causal_conv1d_step, chunk_linear_attention, linear_attention_step


ADOPTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """RoPE on ``[B, T, H, D]`` with ``cos``/``sin`` as ``[B, T, D]`` (the families' rotate-half convention)."""
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


def padding_mask_for(attention_mask, T: int):
    """The ``[B, T]`` bool validity of the current tokens from a 2D mask, or None when there is no padding."""
    if attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        return None
    m = attention_mask[:, -T:].bool()
    return None if bool(m.all()) else m


class Mixer(nn.Module):
    """Base class: adopts the source attention's projections and knows the head geometry."""

    layer_type = "linear_attention"
    new_parameter_prefixes: tuple[str, ...] = ()

    def __init__(self, config, layer_idx: int, attn: nn.Module):
        super().__init__()
        base = config.base_config
        self.layer_idx = layer_idx
        self.num_heads = base.num_attention_heads
        self.num_kv_heads = getattr(base, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(base, "head_dim", None) or base.hidden_size // self.num_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        for name in ADOPTED_MODULES:
            if hasattr(attn, name):
                self.add_module(name, getattr(attn, name))
        self.settings = config.mixer_settings(layer_idx)

    def project(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def repeat_kv(self, x):
        rep = self.num_heads // self.num_kv_heads
        return x if rep == 1 else x.repeat_interleave(rep, dim=2)

    def new_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the parameters the conversion created."""
        return [n for n, _ in self.named_parameters() if n.startswith(self.new_parameter_prefixes)]

    def init_new_parameters(self) -> None:
        raise NotImplementedError

    def cache_bytes(self, seq_len: int, batch: int = 1, kv_bytes: int = 2) -> int:
        """Bytes this layer keeps in the cache after ``seq_len`` tokens (states are fp32)."""
        raise NotImplementedError

    @staticmethod
    def cache_layer(kwargs, layer_idx):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return None if cache is None else cache.layers[layer_idx]


class SupraMixer(Mixer):
    """SUPRA (Mercat et al. 2024, "Linearizing Large Language Models", sec. 3).

    o_t = GroupNorm( sum_{s<=t} gamma_h^{t-s} <rope(phi(q_t)), rope(phi(k_s))> v_s ),  phi(x) = ReLU(W x + b)

    The feature map is shared across heads (one for queries, one for keys), RoPE is applied after it, the
    decay gamma_h is fixed per head (RetNet's 1 - 2^{-5-h}, Sun et al. 2023 eq. 8, with the exponents spread
    over [5, 12] when there are more than 8 heads), and a per-head GroupNorm replaces the softmax denominator.
    """

    layer_type = "linear_attention"
    new_parameter_prefixes = ("feature_map_q", "feature_map_k", "norm")

    def __init__(self, config, layer_idx, attn):
        super().__init__(config, layer_idx, attn)
        D, H = self.head_dim, self.num_heads
        if D % 2:
            raise ValueError(f"SUPRA applies RoPE after the feature map and needs an even head_dim, got {D}")
        self.chunk_size = int(self.settings.get("chunk_size", 64))
        self.feature_map_q = nn.Linear(D, D)
        self.feature_map_k = nn.Linear(D, D)
        self.norm = nn.GroupNorm(H, H * D, eps=float(self.settings.get("norm_eps", 1e-5)))
        self.register_buffer("log_decay", self.default_log_decay(H))

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
            self.log_decay.copy_(self.default_log_decay(self.num_heads))

    def cache_bytes(self, seq_len, batch=1, kv_bytes=2):
        return batch * self.num_heads * self.head_dim * self.head_dim * 4

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

        layer = self.cache_layer(kwargs, self.layer_idx)
        state = layer.recurrent_states[0] if layer is not None and layer.is_recurrent_states_initialized[0] else None
        if T == 1 and state is not None:
            o, new_state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], self.log_decay, state, scale=self.head_dim**-0.5)
            o = o.unsqueeze(1)
        else:
            o, new_state = chunk_linear_attention(
                q, k, v, g=self.log_decay, scale=self.head_dim**-0.5, initial_state=state,
                output_final_state=layer is not None, chunk_size=self.chunk_size,
            )
        if layer is not None:
            layer.update_recurrent_state(new_state, 0)

        o = self.norm(o.reshape(B * T, -1)).view(B, T, -1)
        return self.o_proj(o.to(hidden_states.dtype)), None


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
        z = torch.einsum("bthd,hde->bthe", x, self.weight) + self.bias
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


class LolcatsMixer(Mixer):
    """LoLCATs-style attention (Zhang et al. 2024, "LoLCATs", eq. 6): a softmax over the last ``window``
    tokens plus ``sinks`` first tokens, and Hedgehog linear attention over every older token:

        y_t = (a_sm sum_{s in win(t)} e^{q.k_s/sqrt(d) - m_t} v_s + a_ln phi(q_t)^T S_t)
              / (a_sm sum_{s in win(t)} e^{q.k_s/sqrt(d) - m_t}     + a_ln phi(q_t)^T z_t)

    with a_ln = sigmoid(linear_mix_logit_h) and a_sm = 1 - a_ln per head; S_t, z_t sum phi(k_s) v_s^T and
    phi(k_s) over s in [sinks, t - window]. The mixing logit starts at -6 (a_ln = 0.0025), so the untrained
    conversion is close to the window-only model (see DESIGN.md's calibration run).
    """

    layer_type = "hybrid_sliding_sink"
    new_parameter_prefixes = ("feature_map_q", "feature_map_k", "linear_mix_logit")
    query_block = 256

    def __init__(self, config, layer_idx, attn):
        super().__init__(config, layer_idx, attn)
        self.window = int(self.settings.get("window", 64))
        self.sinks = int(self.settings.get("sinks", 4))
        if self.window < 1 or self.sinks < 0:
            raise ValueError(f"window must be >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}")
        self.chunk_size = int(self.settings.get("chunk_size", 64))
        self.init_mix_logit = float(self.settings.get("init_linear_mix_logit", -6.0))
        # linear_branch=False gives the window-only (+ sinks) softmax baseline: older tokens are dropped
        self.linear_branch = bool(self.settings.get("linear_branch", True))
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim)
        self.feature_map_k = HedgehogFeatureMap(self.num_heads, self.head_dim)
        self.linear_mix_logit = nn.Parameter(torch.full((self.num_heads,), self.init_mix_logit))

    def init_new_parameters(self):
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()
        with torch.no_grad():
            self.linear_mix_logit.fill_(self.init_mix_logit)

    def cache_bytes(self, seq_len, batch=1, kv_bytes=2):
        D = self.head_dim
        state = self.num_heads * 2 * D * (D + 1) * 4  # Hedgehog features (2D) x (values + normaliser), fp32
        kept = min(seq_len, self.sinks) + min(max(seq_len - self.sinks, 0), self.window)
        return batch * (state + 2 * self.num_kv_heads * D * kept * kv_bytes)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        H, D, S, W = self.num_heads, self.head_dim, self.sinks, self.window
        q, k, v = self.project(hidden_states)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the cache keeps keys/values as the model computed them (its dtype), per KV head
        q = q.float()
        valid = padding_mask_for(attention_mask, T)
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid

        layer = self.cache_layer(kwargs, self.layer_idx)
        n = 0
        empty = k.new_zeros(B, 0, k.shape[2], D)
        sink_k = sink_v = recent_k = recent_v = empty
        sink_ok = recent_ok = valid[:, :0]
        state = None
        if layer is not None and layer.seen_tokens > 0:
            n = layer.seen_tokens
            sink_k, sink_v, sink_ok = layer.sink_k, layer.sink_v, layer.sink_valid
            recent_k, recent_v, recent_ok = layer.recent_k, layer.recent_v, layer.recent_valid
            state = layer.state()
        r = recent_k.shape[1]
        p0 = n - r  # position of the first token of [recent, new]

        # contiguous run of [recent, new] tokens, positions p0 .. n+T-1 (KV heads, model dtype)
        run_k_kv, run_v_kv = torch.cat([recent_k, k], 1), torch.cat([recent_v, v], 1)
        run_ok = torch.cat([recent_ok, valid], 1)
        run_pos = torch.arange(p0, n + T, device=q.device)
        run_k, run_v = run_k_kv.float(), run_v_kv.float()  # KV heads: the softmax groups query heads (GQA)

        # ---- linear part: query at position t sees run keys with position <= t - W (and >= S) -------------
        # Left-padding the run with W - r zeros and keeping T entries aligns key t - W with query t, so an
        # ordinary causal linear attention (initial state = the cached state) computes it; its final state
        # covers every position <= n + T - 1 - W, as the next call expects. Only the first T - shift run keys
        # survive the [:T] cut, so only their features are computed (one key per decode step, not the window).
        shift = W - r
        need = max(0, min(run_k.shape[1], T - shift))
        fk = self.feature_map_k(self.repeat_kv(run_k[:, :need]))
        lin_ok = (run_ok[:, :need] & (run_pos[:need] >= S)).to(fk.dtype)[..., None, None]
        fk = fk * lin_ok
        v_lin = self.repeat_kv(run_v[:, :need])
        v1 = torch.cat([v_lin, torch.ones_like(v_lin[..., :1])], -1) * lin_ok  # last column: normaliser z
        fk = F.pad(fk, (0, 0, 0, 0, shift, 0))[:, :T]
        v1 = F.pad(v1, (0, 0, 0, 0, shift, 0))[:, :T]
        fq = self.feature_map_q(q)
        if not self.linear_branch:
            o_lin = q.new_zeros(B, T, H, D + 1)
            new_state = q.new_zeros(B, H, 2 * D, D + 1) if state is None else state
        elif T == 1 and state is not None:
            o_lin, new_state = linear_attention_step(fq[:, 0], fk[:, 0], v1[:, 0], None, state, scale=1.0)
            o_lin = o_lin.unsqueeze(1)
        else:
            o_lin, new_state = chunk_linear_attention(
                fq, fk, v1, scale=1.0, initial_state=state, output_final_state=True, chunk_size=self.chunk_size
            )

        # ---- softmax part over sinks + window, in query blocks (memory O(T * (S + W + block))) -------------
        num, den = self._window_softmax(
            q, sink_k.float(), sink_v.float(), sink_ok, run_k, run_v, run_ok, run_pos, n
        )

        a_ln = torch.sigmoid(self.linear_mix_logit.float())[None, None, :, None] * float(self.linear_branch)
        a_sm = 1.0 - a_ln
        y = (a_sm * num + a_ln * o_lin[..., :D]) / (a_sm * den + a_ln * o_lin[..., D:]).clamp_min(1e-12)

        if layer is not None:
            self._update_cache(layer, n, T, k, v, valid, sink_k, sink_v, sink_ok, run_k_kv, run_v_kv, run_ok, run_pos, new_state)
        y = y.reshape(B, T, H * D).to(hidden_states.dtype)
        return self.o_proj(y), None

    def _window_softmax(self, q, sink_k, sink_v, sink_ok, run_k, run_v, run_ok, run_pos, n):
        """Un-normalised softmax over sinks + window. Keys/values have the KV heads; each KV head serves its
        group of G query heads (query head h*G + g reads KV head h, as repeat_kv lays them out)."""
        B, T, H, D = q.shape
        Hkv = run_k.shape[2]
        G = H // Hkv
        S, W = self.sinks, self.window
        p0 = int(run_pos[0]) if run_pos.numel() else n
        ns = max(0, min(S - n, T)) if n < S else 0  # new tokens that are sinks sit at run[0:ns] (no recent then)
        nums, dens = [], []
        for a in range(0, T, self.query_block):
            b = min(T, a + self.query_block)
            lo = max(ns, n + a - W + 1 - p0, 0)
            hi = n + b - p0
            keys = torch.cat([sink_k, run_k[:, :ns], run_k[:, lo:hi]], 1)
            vals = torch.cat([sink_v, run_v[:, :ns], run_v[:, lo:hi]], 1)
            ok = torch.cat([sink_ok, run_ok[:, :ns], run_ok[:, lo:hi]], 1)  # [B, K]
            pos = torch.cat(
                [torch.arange(sink_k.shape[1], device=q.device), run_pos[:ns], run_pos[lo:hi]]
            )  # [K]
            qpos = torch.arange(n + a, n + b, device=q.device)  # [Q]
            allowed = (pos[None] <= qpos[:, None]) & ((pos[None] < S) | (pos[None] > qpos[:, None] - W))
            allowed = allowed[None] & (ok[:, None, :] | (pos[None, None] == qpos[None, :, None]))  # [B, Q, K]
            qg = q[:, a:b].reshape(B, b - a, Hkv, G, D)
            s = torch.einsum("bqhgd,bkhd->bhgqk", qg, keys) * self.scaling
            s = s.masked_fill(~allowed[:, None, None], float("-inf"))
            p = torch.exp(s - s.amax(-1, keepdim=True))
            nums.append(torch.einsum("bhgqk,bkhd->bqhgd", p, vals).reshape(B, b - a, H, D))
            dens.append(p.sum(-1).reshape(B, H, b - a).transpose(1, 2).unsqueeze(-1))
        return torch.cat(nums, 1), torch.cat(dens, 1)

    def _update_cache(self, layer, n, T, k, v, valid, sink_k, sink_v, sink_ok, run_k, run_v, run_ok, run_pos, state):
        S, W = self.sinks, self.window
        end = n + T
        ns = max(0, min(S - n, T)) if n < S else 0
        with torch.no_grad():
            layer.sink_k = torch.cat([sink_k, k[:, :ns]], 1).detach()
            layer.sink_v = torch.cat([sink_v, v[:, :ns]], 1).detach()
            layer.sink_valid = torch.cat([sink_ok, valid[:, :ns]], 1)
            # run_pos is consecutive: the kept tail (positions >= max(S, end - W)) is a slice; cloned so the
            # cache does not keep the whole prefill's keys alive through a view
            first = max(0, max(S, end - W) - (end - run_pos.shape[0]))
            layer.recent_k = run_k[:, first:].detach().clone()
            layer.recent_v = run_v[:, first:].detach().clone()
            layer.recent_valid = run_ok[:, first:].clone()
            layer.set_state(state.detach())
            layer.seen_tokens = end


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
    C <- Q, out_proj <- O (d_state = head_dim; x and B have the KV heads and are repeated for GQA); z, dt, A,
    D, conv and norm are fresh (Mamba2's defaults). q_norm/k_norm of families that have them act on C/B.
    """

    layer_type = "linear_attention"
    adopts_projections = False

    def __init__(self, config, layer_idx, attn):
        nn.Module.__init__(self)
        base = config.base_config
        self.layer_idx = layer_idx
        self.num_heads = base.num_attention_heads
        self.num_kv_heads = getattr(base, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(base, "head_dim", None) or base.hidden_size // self.num_heads
        self.settings = config.mixer_settings(layer_idx)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.d_inner, self.d_xb = H * D, Hkv * D
        self.conv_kernel = int(self.settings.get("conv_kernel", 4))
        self.chunk_size = int(self.settings.get("chunk_size", 64))
        self.conv_init = self.settings.get("conv_init", "default")
        if self.conv_init not in ("default", "identity"):
            raise ValueError(f"conv_init {self.conv_init!r}; accepted: default, identity")
        bias = getattr(attn, "q_proj", None) is not None and attn.q_proj.bias is not None
        hidden = base.hidden_size
        self.in_proj = nn.Linear(hidden, 2 * self.d_inner + 2 * self.d_xb + H, bias=bias)
        conv_dim = self.d_inner + 2 * self.d_xb
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.conv_kernel, groups=conv_dim, padding=self.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        # the source's RMSNorm epsilon unless set (Llama-3's 1e-5 is what the paper's Mamba2 uses)
        eps = float(self.settings.get("norm_eps", getattr(base, "rms_norm_eps", 1e-5)))
        self.norm = GatedRMSNorm(self.d_inner, D, eps=eps)
        o_bias = getattr(attn, "o_proj", None) is not None and attn.o_proj.bias is not None
        self.out_proj = nn.Linear(self.d_inner, hidden, bias=o_bias)
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                self.add_module(name, getattr(attn, name))

    def new_parameter_names(self):
        return [n for n, _ in self.named_parameters() if not n.startswith(("q_norm", "k_norm"))]

    def _split(self):
        H = self.num_heads
        return [self.d_inner, self.d_xb, self.d_xb, self.d_inner, H]  # z, x, B, C, dt

    def init_new_parameters(self):
        """Mamba2's own initialisation for the fresh parts (deterministic per layer, so runs are reproducible)."""
        g = torch.Generator().manual_seed(1000 + self.layer_idx)
        H = self.num_heads
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_proj.in_features)
            self.in_proj.weight.uniform_(-bound, bound, generator=g)
            if self.in_proj.bias is not None:
                self.in_proj.bias.zero_()
            if self.conv_init == "identity":  # pass-through conv: the untrained mixer is linear attention
                self.conv1d.weight.zero_()
                self.conv1d.weight[..., -1] = 1.0
            else:
                cb = 1 / math.sqrt(self.conv_kernel)
                self.conv1d.weight.uniform_(-cb, cb, generator=g)
            self.conv1d.bias.zero_() if self.conv_init == "identity" else self.conv1d.bias.uniform_(-cb, cb, generator=g)
            # dt ~ log-uniform in [1e-3, 1e-1], stored through the inverse of softplus; A ~ U[1, 16]
            dt = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(H).uniform_(1, 16, generator=g)))
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)
            bound = 1 / math.sqrt(self.out_proj.in_features)
            self.out_proj.weight.uniform_(-bound, bound, generator=g)

    def init_from_attention(self, attn):
        """The paper's initialisation: rows of in_proj from V, K, Q; out_proj from O."""
        z, x, b, c, _ = self._split()
        with torch.no_grad():
            w = self.in_proj.weight
            w[z : z + x].copy_(attn.v_proj.weight)
            w[z + x : z + x + b].copy_(attn.k_proj.weight)
            w[z + x + b : z + x + b + c].copy_(attn.q_proj.weight)
            if self.in_proj.bias is not None:
                self.in_proj.bias[z : z + x].copy_(attn.v_proj.bias)
                self.in_proj.bias[z + x : z + x + b].copy_(attn.k_proj.bias)
                self.in_proj.bias[z + x + b : z + x + b + c].copy_(attn.q_proj.bias)
            self.out_proj.weight.copy_(attn.o_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(attn.o_proj.bias)

    def cache_bytes(self, seq_len, batch=1, kv_bytes=2):
        conv = (self.d_inner + 2 * self.d_xb) * (self.conv_kernel - 1) * kv_bytes
        return batch * (conv + self.num_heads * self.head_dim * self.head_dim * 4)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        Bsz, T, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        z, xBC, dt = torch.split(self.in_proj(hidden_states), [self.d_inner, self.d_inner + 2 * self.d_xb, H], -1)
        valid = padding_mask_for(attention_mask, T)
        if valid is not None:  # padded tokens feed neither the conv nor the state
            xBC = xBC * valid[..., None].to(xBC.dtype)

        layer = self.cache_layer(kwargs, self.layer_idx)
        conv_state = layer.conv_states[0] if layer is not None and layer.has_previous_state[0] else None
        ssm_state = layer.recurrent_states[0] if layer is not None and layer.is_recurrent_states_initialized[0] else None
        weight = self.conv1d.weight.squeeze(1)
        if T == 1 and conv_state is not None:
            # the step returns the slid window (a fused kernel slides the cached one in place)
            y1, new_conv = causal_conv1d_step(xBC[:, 0], weight, self.conv1d.bias, conv_state)
            conv_state.copy_(new_conv)
            xBC_act = y1.unsqueeze(1)
        else:
            xBC_act, _ = causal_conv1d(xBC, weight, self.conv1d.bias, conv_state)
            if layer is not None:
                layer.update_conv_state(xBC.transpose(1, 2), 0, conv_kernel_size=self.conv_kernel - 1)

        x, Bm, C = torch.split(xBC_act, [self.d_xb, self.d_xb, self.d_inner], -1)
        x = self.repeat_kv(x.view(Bsz, T, Hkv, D))
        Bm = Bm.view(Bsz, T, Hkv, D)
        C = C.view(Bsz, T, H, D)
        if hasattr(self, "q_norm"):
            C, Bm = self.q_norm(C), self.k_norm(Bm)
        Bm = self.repeat_kv(Bm)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        if valid is not None:
            dt = dt * valid[..., None]
        g = dt * -torch.exp(self.A_log.float())  # log-decay dt * A, A < 0
        v = x.float() * dt[..., None]
        if T == 1 and ssm_state is not None:
            y, new_state = linear_attention_step(C[:, 0], Bm[:, 0], v[:, 0], g[:, 0], ssm_state, scale=1.0)
            y = y.unsqueeze(1)
        else:
            y, new_state = chunk_linear_attention(C, Bm, v, g=g, scale=1.0, initial_state=ssm_state,
                                                  output_final_state=layer is not None, chunk_size=self.chunk_size)
        if layer is not None:
            layer.update_recurrent_state(new_state, 0)
        y = y + self.D.float()[None, None, :, None] * x.float()
        y = self.norm(y.reshape(Bsz, T, -1), z)
        return self.out_proj(y.to(hidden_states.dtype)), None


MIXERS: dict[str, type[Mixer]] = {
    "supra": SupraMixer,
    "lolcats": LolcatsMixer,
    "mamba2": Mamba2Mixer,
}


def get_mixer(name: str) -> type[Mixer]:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; accepted: attention, {', '.join(sorted(MIXERS))}")
    return MIXERS[name]
