"""Softmax attention over a sliding window plus sink tokens, and the frame of every "window + memory" mixer.

``WindowMixer`` alone keeps, per query at position t, the first ``sinks`` tokens (attention sinks, Xiao et al.
2024, "Efficient Streaming Language Models with Attention Sinks") and the last ``window`` tokens (t - window <
s <= t) with the layer's own projections and RoPE; older tokens are forgotten. Mixers that remember what leaves
the window subclass it and override the memory hooks:

* ``carry(hidden_states)``: what each token carries while it sits in the window, for its memory write when it
  leaves (e.g. AHN's write gates from its normalised hidden state); kept in the cache with its key and value;
* ``memory(hidden_states, q, evicted, state)``: read and write the memory for this call's queries. ``evicted``
  holds the tokens that leave the window during the call, aligned so that query t's step writes the token at
  position t - window (never a sink, never padding) before query t reads; returns the memory's output and state;
* ``combine(num, den, memory_out)``: the layer output per head from the window's un-normalised softmax
  (``num / den`` is the window attention) and the memory output.

Decoding keeps a bounded cache (``sink_window_cache.py``): the sinks, the window's keys/values/carry and the
memory state. A prompt in one forward gives the same outputs as feeding it token by token.

Only torch/transformers and sibling files are imported: this file ships with converted models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mixer_base import Mixer, apply_rope, padding_mask_for
from .sink_window_cache import SinkWindowLayer  # importing it registers the window cache layer types


@dataclass
class Evicted:
    """Tokens leaving the window during one call. ``k``/``v`` ([B, n, Hkv, D] fp32, the KV heads), ``carry``
    ([B, n, X] or None) and ``ok`` ([B, n] bool: a real token, not a sink) hold the n tokens in order; query t
    of the call writes token t - ``shift`` (``align`` lays any [B, n, ...] tensor out along the T queries, zeros
    where nothing leaves)."""

    k: torch.Tensor
    v: torch.Tensor
    carry: torch.Tensor | None
    ok: torch.Tensor
    shift: int
    T: int

    def align(self, x: torch.Tensor) -> torch.Tensor:
        pad = [0, 0] * (x.dim() - 2) + [self.shift, 0]
        return F.pad(x, pad)[:, : self.T]


class WindowMixer(Mixer):
    """Sliding window + sink tokens softmax; no memory (the window-only baseline, and the base of LoLCATs / AHN)."""

    name = "window"
    layer_type = "sliding_sink_attention"
    can_run_as_source = True
    SETTINGS = {"window": 64, "sinks": 4}
    query_block = 256  # queries per block of the parallel softmax: memory O(T * (sinks + window + block))

    def __init__(self, config, layer_idx, attn, settings):
        super().__init__(config, layer_idx, attn, settings)
        self.window = int(self.setting("window"))
        self.sinks = int(self.setting("sinks"))
        if self.window < 1 or self.sinks < 0:
            raise ValueError(f"window must be >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}")
        # a source layer that is itself sliding-window attention never saw further back: the window stays within it
        base = config.base_config
        types = getattr(base, "layer_types", None) or []
        sliding = (types[layer_idx] == "sliding_attention") if types else \
            (getattr(base, "sliding_window", None) is not None and getattr(base, "use_sliding_window", True))
        self.source_window = int(base.sliding_window) if sliding and getattr(base, "sliding_window", None) else None
        if self.source_window is not None:
            self.window = min(self.window, self.source_window)
        # True: run as the source attention (full causal softmax, no memory): the teacher of self-distillation,
        # held in the same weights (see ``source_view`` in modeling_rnnify.py)
        self.as_source = False

    def init_new_parameters(self):
        pass  # the window reuses the source attention's projections only

    # ---- memory hooks (none here) -----------------------------------------------------------------------
    carry_width = 0  # floats per token in ``carry``

    def carry(self, hidden_states):
        return None

    def memory(self, hidden_states, q, evicted: Evicted, state):
        return None, state

    def combine(self, num, den, memory_out):
        return num / den

    def memory_state_bytes(self) -> int:
        return 0

    # ---- cache size ---------------------------------------------------------------------------------------
    def mixing_flops(self, context: int) -> float:
        """Softmax over the sinks and the window (keys: half the context on average for a causal prefix, at most
        sinks + window), plus the memory's state read and written once when there is one."""
        keys = min(context / 2, self.window + self.sinks)
        memory = 4 * self.num_heads * self.head_dim * self.head_dim if self.memory_state_bytes() else 0
        return 4 * self.num_heads * self.head_dim * keys + memory

    def cache_bytes(self, seq_len, batch=1, kv_bytes=2):
        kept = min(seq_len, self.sinks) + min(max(seq_len - self.sinks, 0), self.window)
        in_window = min(max(seq_len - self.sinks, 0), self.window)
        per_token = 2 * self.num_kv_heads * self.head_dim * kv_bytes
        return batch * (kept * per_token + in_window * self.carry_width * kv_bytes + self.memory_state_bytes())

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        S, W = (0, self.source_window or 1 << 60) if self.as_source else (self.sinks, self.window)
        q, k, v = self.project(hidden_states)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the cache keeps keys/values as the model computed them (its dtype), per KV head
        q = q.float()
        valid = padding_mask_for(attention_mask, T)
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid
        carry = self.carry(hidden_states)

        layer = None if self.as_source else self.cache_layer(kwargs)  # the source view is for training: no cache
        n = 0
        empty = k.new_zeros(B, 0, k.shape[2], D)
        sink_k = sink_v = recent_k = recent_v = empty
        sink_ok = recent_ok = recent_sink = valid[:, :0]
        recent_carry = None if carry is None else carry[:, :0]
        counted = torch.zeros(B, dtype=torch.long, device=q.device)
        state = None
        if layer is not None and layer.seen_tokens > 0:
            n = layer.seen_tokens
            sink_k, sink_v, sink_ok = layer.sink_k, layer.sink_v, layer.sink_valid
            recent_k, recent_v, recent_ok = layer.recent_k, layer.recent_v, layer.recent_valid
            recent_sink, recent_carry, counted = layer.recent_sink, layer.recent_carry, layer.valid_count
            state = layer.state()
        # sinks are the first S real tokens of each row (left padding moves them right): rank = real tokens before
        rank = counted[:, None] + valid.long().cumsum(1) - valid.long()
        is_sink = valid & (rank < S)
        r = recent_k.shape[1]
        p0 = n - r  # position of the first token of [recent, new]

        # contiguous run of [recent, new] tokens, positions p0 .. n+T-1 (KV heads, model dtype)
        run_k_kv, run_v_kv = torch.cat([recent_k, k], 1), torch.cat([recent_v, v], 1)
        run_ok, run_sink = torch.cat([recent_ok, valid], 1), torch.cat([recent_sink, is_sink], 1)
        run_pos = torch.arange(p0, n + T, device=q.device)
        run_carry = None if carry is None else torch.cat([recent_carry, carry], 1)
        run_k, run_v = run_k_kv.float(), run_v_kv.float()  # KV heads: the softmax groups query heads (GQA)

        # ---- memory: query t (position n + t) follows the write of the token at position n + t - W -----------
        # that is run token t - shift with shift = W - r; only the first T - shift run tokens leave in this call.
        shift = W - r
        need = max(0, min(run_k.shape[1], T - shift))
        evicted = Evicted(run_k[:, :need], run_v[:, :need], None if run_carry is None else run_carry[:, :need],
                          run_ok[:, :need] & ~run_sink[:, :need], shift, T)
        if not self.as_source:
            memory_out, new_state = self.memory(hidden_states, q, evicted, state)

        # ---- softmax part over sinks + window, in query blocks -------------------------------------------------
        c = int(is_sink.any(0).nonzero().max()) + 1 if bool(is_sink.any()) else 0  # new tokens that may be sinks
        num, den = self._window_softmax(
            q, (sink_k.float(), sink_v.float(), sink_ok), (k[:, :c].float(), v[:, :c].float(), is_sink[:, :c]),
            (run_k, run_v, run_ok, run_sink, run_pos), n, W)
        if self.as_source:
            y = num / den
        else:
            y = self.combine(num, den, memory_out)

        if layer is not None:
            self._update_cache(layer, n, T, k, v, valid, rank, is_sink, counted, (sink_k, sink_v, sink_ok),
                               (run_k_kv, run_v_kv, run_ok, run_sink, run_pos, run_carry), new_state)
        y = y.reshape(B, T, H * D).to(hidden_states.dtype)
        return self.o_proj(y), None

    def _window_softmax(self, q, sinks, new_sinks, run, n, W):
        """Un-normalised softmax over sinks + window (each row shifted by its max): the stored sinks (all earlier),
        this call's first tokens that are sinks in some row, and the run's window slice. Keys/values have the KV
        heads; each KV head serves its group of G query heads (query head h*G + g reads KV head h, as repeat_kv lays
        them out)."""
        B, T, H, D = q.shape
        (sink_k, sink_v, sink_ok), (cand_k, cand_v, cand_ok), (run_k, run_v, run_ok, run_sink, run_pos) = \
            sinks, new_sinks, run
        Hkv = run_k.shape[2]
        G = H // Hkv
        p0 = int(run_pos[0]) if run_pos.numel() else n
        cand_pos = torch.arange(n, n + cand_k.shape[1], device=q.device)
        # leading run tokens that are sinks in every row are served by the sink part: the window slice skips them
        lead = run_ok & run_sink
        skip = int(lead.all(0).long().cumprod(0).sum()) if lead.numel() else 0
        nums, dens = [], []
        for a in range(0, T, self.query_block):
            b = min(T, a + self.query_block)
            lo, hi = max(n + a - W + 1 - p0, skip, 0), n + b - p0
            qpos = torch.arange(n + a, n + b, device=q.device)  # [Q]
            pos, ok, sink = run_pos[lo:hi], run_ok[:, lo:hi], run_sink[:, lo:hi]
            in_window = (pos[None] <= qpos[:, None]) & (pos[None] > qpos[:, None] - W)  # [Q, K]
            # a window key is a real non-sink token; a padded query sees itself only (keeps its row finite)
            window_ok = in_window[None] & ((ok & ~sink)[:, None, :] | (~ok[:, None, :] & (pos[None] == qpos[:, None])[None]))
            allowed = torch.cat([
                sink_ok[:, None, :].expand(B, b - a, -1),
                cand_ok[:, None, :] & (cand_pos[None] <= qpos[:, None])[None],
                window_ok], -1)  # [B, Q, K]
            keys = torch.cat([sink_k, cand_k, run_k[:, lo:hi]], 1)
            vals = torch.cat([sink_v, cand_v, run_v[:, lo:hi]], 1)
            qg = q[:, a:b].reshape(B, b - a, Hkv, G, D)
            s = torch.einsum("bqhgd,bkhd->bhgqk", qg, keys) * self.scaling
            s = s.masked_fill(~allowed[:, None, None], float("-inf"))
            p = torch.exp(s - s.amax(-1, keepdim=True))
            nums.append(torch.einsum("bhgqk,bkhd->bqhgd", p, vals).reshape(B, b - a, H, D))
            dens.append(p.sum(-1).reshape(B, H, b - a).transpose(1, 2).unsqueeze(-1))
        return torch.cat(nums, 1), torch.cat(dens, 1)

    def _update_cache(self, layer, n, T, k, v, valid, rank, is_sink, counted, sinks, run, state):
        S, W = self.sinks, self.window
        (sink_k, sink_v, sink_ok), (run_k, run_v, run_ok, run_sink, run_pos, run_carry) = sinks, run
        end = n + T
        with torch.no_grad():
            # sinks by rank: row b's i-th real token sits at column i (columns grow up to S)
            total = counted + valid.sum(1)
            width = min(S, int(total.max())) if total.numel() else 0
            grow = width - sink_k.shape[1]
            if grow > 0:
                sink_k = torch.cat([sink_k, k.new_zeros(k.shape[0], grow, *k.shape[2:])], 1)
                sink_v = torch.cat([sink_v, v.new_zeros(v.shape[0], grow, *v.shape[2:])], 1)
                sink_ok = torch.cat([sink_ok, sink_ok.new_zeros(sink_ok.shape[0], grow)], 1)
            rows, cols = is_sink.nonzero(as_tuple=True)
            if rows.numel():
                sink_k, sink_v, sink_ok = sink_k.clone(), sink_v.clone(), sink_ok.clone()
                sink_k[rows, rank[rows, cols]] = k[rows, cols]
                sink_v[rows, rank[rows, cols]] = v[rows, cols]
                sink_ok[rows, rank[rows, cols]] = True
            layer.sink_k, layer.sink_v, layer.sink_valid = sink_k.detach(), sink_v.detach(), sink_ok
            layer.valid_count = total
            # the window: the last W positions at or after S (earlier positions are sinks or padding). run_pos is
            # consecutive, so the kept tail is a slice; cloned so the cache does not keep the whole prefill's keys
            # alive through a view
            first = max(0, max(S, end - W) - (end - run_pos.shape[0]))
            layer.recent_k = run_k[:, first:].detach().clone()
            layer.recent_v = run_v[:, first:].detach().clone()
            layer.recent_valid = run_ok[:, first:].clone()
            layer.recent_sink = run_sink[:, first:].clone()
            layer.recent_carry = None if run_carry is None else run_carry[:, first:].detach().clone()
            if state is not None:
                layer.set_state(state.detach())
            layer.seen_tokens = end


__all__ = ["Evicted", "SinkWindowLayer", "WindowMixer"]
