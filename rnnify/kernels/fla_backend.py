"""flash-linear-attention (``pip install 'rnnify[fla]'``) behind rnnify's op signatures, for comparison runs
(``RNNIFY_KERNELS=fla``) and the kernel benchmark. fla has no separate short-convolution op with our
signature: ``ops.OPS`` routes the conv ops of this backend to rnnify's Triton kernels."""

from __future__ import annotations

import torch


def _per_token_decay(g, B, T, H):
    """fla takes a per-head constant decay as ``g_gamma`` and a data-dependent one as ``g`` [B, T, H]."""
    if g is None:
        return None, None
    return (None, g.float()) if g.dim() == 1 else (g.float(), None)


def chunk_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                           cu_seqlens=None):
    from fla.ops.simple_gla import chunk_simple_gla  # optional: pip install 'rnnify[fla]'

    B, T, H, _ = q.shape
    g_tok, g_gamma = _per_token_decay(g, B, T, H)
    return chunk_simple_gla(q, k, v, g=g_tok, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def linear_attention_step(q, k, v, g, state, scale=None):
    from fla.ops.simple_gla import fused_recurrent_simple_gla  # optional: pip install 'rnnify[fla]'

    B, H, _ = q.shape
    g_tok, g_gamma = _per_token_decay(g if g is None or g.dim() == 1 else g.unsqueeze(1), B, 1, H)
    o, state = fused_recurrent_simple_gla(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), g=g_tok, g_gamma=g_gamma,
                                          scale=scale, initial_state=state, output_final_state=True)
    return o[:, 0], state


def chunk_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                     cu_seqlens=None):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # optional: pip install 'rnnify[fla]'

    B, T, H, _ = q.shape
    g = torch.zeros(B, T, H, device=q.device) if g is None else g.float().expand(B, T, H)
    return chunk_gated_delta_rule(q, k, v, g=g.contiguous(), beta=beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def delta_rule_step(q, k, v, beta, g, state, scale=None):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule  # optional: pip install 'rnnify[fla]'

    B, H, _ = q.shape
    g = torch.zeros(B, H, device=q.device) if g is None else g.float().expand(B, H)
    o, state = fused_recurrent_gated_delta_rule(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), g=g.unsqueeze(1),
                                                beta=beta.unsqueeze(1), scale=scale, initial_state=state,
                                                output_final_state=True)
    return o[:, 0], state
