"""The interface every token mixer implements, and the helpers mixers share.

A mixer replaces one source attention layer. What it takes from that attention is declared, not guessed:

* ``adopts``: attention modules kept under the same names (``q_proj`` ...), so a converted checkpoint shares its
  parameter names with the source and those weights are the source's;
* ``absorbs``: attention modules whose weights initialise new parameters in ``init_from_attention`` and are then
  not kept (Mamba2 folds q/k/v/o into ``in_proj``/``out_proj``);
* ``new_parameter_names()``: everything else, the parameters the conversion creates (distillation trains these);
* ``init_new_parameters()``: their fresh initialisation; ``init_from_attention(attn)``: what is copied from the
  source attention after that;
* ``cache_bytes(seq_len, batch, kv_bytes)``: what the layer keeps in the cache after ``seq_len`` tokens, with
  keys/values at ``kv_bytes`` each and recurrent states in fp32 (``STATE_BYTES``) whatever the model's dtype.

Each mixer has a parallel (chunked) form for prompts and training and a recurrent form for decoding; both read and
write the layer's cache slot ``self.layer_idx`` (transformers' convention; the model moves it for looped steps).

Only torch (and rnnify's kernels when installed) is imported: this file ships with converted models.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

try:  # rnnify's dispatching ops (fused kernels for CUDA tensors) when rnnify is installed
    from rnnify import kernels
except ImportError:  # a converted model loaded with trust_remote_code where rnnify is not installed
    from .kernels_reference import this_module as kernels  # a from-import: transformers ships what these name

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
STATE_BYTES = 4  # recurrent states are kept in fp32


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


def gated_log_decay(A_log, dt_bias, logits):
    """Per head and token, the log of a data-dependent decay in Mamba2's parametrisation (Gated DeltaNet, Yang et
    al. 2025, sec. 3): log a_t = -exp(A_log) softplus(logit_t + dt_bias). Float32, the shape of ``logits`` [..., H]."""
    return -torch.exp(A_log.float()) * torch.nn.functional.softplus(logits.float() + dt_bias.float())


def l2_normalize(x, eps: float = 1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class Mixer(nn.Module):
    """Base class of every token mixer (see the module docstring for the interface)."""

    name: ClassVar[str] = ""  # registry key; the layer program names mixers by it
    layer_type: ClassVar[str] = "linear_attention"  # the cache layer type of its slot
    adopts: ClassVar[tuple[str, ...]] = ATTENTION_MODULES
    absorbs: ClassVar[tuple[str, ...]] = ()
    # whether it can run as the source attention it replaced (``as_source``): its projections are the source's,
    # unchanged, so the model can be its own self-distillation teacher
    can_run_as_source: ClassVar[bool] = False
    # how StateX (Shen et al. 2025) enlarges its recurrent state: "merge_heads" (a linear-attention state per head,
    # heads merged into one head of H*D keys and values; the mixer reads settings["merge_heads"]), "d_state" (a
    # Mamba2 state: d_state multiplied, the mixer reads settings["d_state"]), or None (nothing to expand)
    state_expansion: ClassVar[str | None] = None
    # every setting the mixer reads, with its default (declared once: the method options that set them take their
    # defaults from here); None where the default comes from the source's config. Subclasses add to their parent's.
    SETTINGS: ClassVar[dict] = {}

    def __init__(self, config, layer_idx: int, attn: nn.Module, settings: dict):
        super().__init__()
        base = config.base_config
        self.layer_idx = layer_idx  # cache slot
        self.source_layer = layer_idx
        self.num_heads = base.num_attention_heads
        self.num_kv_heads = getattr(base, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(base, "head_dim", None) or base.hidden_size // self.num_heads
        self.hidden_size = base.hidden_size
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.settings = dict(settings)
        for name in self.adopts:
            if getattr(attn, name, None) is not None:
                self.add_module(name, getattr(attn, name))

    # ---- the interface ----------------------------------------------------------------------------------
    def new_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the parameters the conversion created."""
        return [n for n, _ in self.named_parameters() if n.split(".")[0] not in self.adopts]

    def init_new_parameters(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must initialise its new parameters")

    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy what the method takes from the source attention beyond the adopted modules (nothing by default)."""

    def cache_bytes(self, seq_len: int, batch: int = 1, kv_bytes: int = 2) -> int:
        raise NotImplementedError(f"{type(self).__name__} must say how many bytes its cache holds")

    def mixing_flops(self, context: int) -> float:
        """Forward FLOPs per token of the sequence mixing beyond the layer's weights, at ``context`` tokens (what
        ``eval/flops.py`` adds to 2 x the weights): a recurrent state of heads x head_dim x head_dim read and written
        once. A mixer whose state or reads differ overrides it."""
        return 4 * self.num_heads * self.head_dim * self.head_dim

    # ---- helpers ----------------------------------------------------------------------------------------
    def project(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if getattr(self, "q_norm", None) is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def repeat_kv(self, x):
        rep = self.num_heads // self.num_kv_heads
        return x if rep == 1 else x.repeat_interleave(rep, dim=2)

    def cache_layer(self, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return None if cache is None else cache.layers[self.layer_idx]

    @classmethod
    def declared_settings(cls) -> dict:
        """SETTINGS of the class and its parents (the nearest declaration wins)."""
        out: dict = {}
        for klass in reversed(cls.__mro__):
            out.update(getattr(klass, "SETTINGS", {}) if "SETTINGS" in vars(klass) else {})
        return out

    def setting(self, name: str):
        """A setting's value for this layer: the step's or the shared config's, else its declared default."""
        declared = type(self).declared_settings()
        if name not in declared:
            raise KeyError(f"mixer {self.name!r} reads setting {name!r}, which its SETTINGS do not declare")
        return self.settings.get(name, declared[name])


__all__ = ["ATTENTION_MODULES", "Mixer", "STATE_BYTES", "apply_rope", "kernels",
           "l2_normalize", "padding_mask_for", "rotate_half"]
