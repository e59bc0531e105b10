"""Configuration of a converted (recurrent or hybrid) model.

A converted model keeps its source ("base") architecture for everything but the token mixers. The base
config is stored whole under ``base_config`` (a transformers sub-config, so ``attn_implementation`` and
dtype propagate); ``layer_types`` gives each layer's cache structure with transformers' own names where
they fit (``full_attention``, ``sliding_attention``, ``linear_attention``) plus ``hybrid_sliding_sink``
for a softmax window with sink tokens next to a linear-attention state; ``layer_mixers`` names the token
mixer of each layer (``attention`` = the source layer, untouched) and ``mixer_config`` its settings.

Only transformers is imported here: this file is copied next to converted models for ``trust_remote_code``.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# Attention layer types of the base model that a kept layer may have.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

# Layer types rnnify adds to transformers' own (cache layers registered in sink_window_cache.py).
RNNIFY_LAYER_TYPES = ("hybrid_sliding_sink",)

# Top-level attributes mirrored from the base config, read by generate(), caches and the trainer.
_MIRRORED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window",
    "bos_token_id", "eos_token_id", "pad_token_id", "final_logit_softcapping",
)


def base_layer_types(base_config) -> list[str]:
    """Per-layer attention type of a source config (``full_attention`` / ``sliding_attention``)."""
    types = getattr(base_config, "layer_types", None)
    if types:
        return list(types)
    window = getattr(base_config, "sliding_window", None)
    kind = "sliding_attention" if window is not None and getattr(base_config, "use_sliding_window", True) else "full_attention"
    return [kind] * base_config.num_hidden_layers


try:  # transformers 5 configs are strict dataclasses whose validators are collected by this decorator
    from huggingface_hub.dataclasses import strict as _strict
except ImportError:  # pragma: no cover
    def _strict(cls):
        return cls


@_strict
class RnnifyConfig(PretrainedConfig):
    model_type = "rnnify"
    sub_configs = {"base_config": AutoConfig}

    def __init__(
        self,
        base_config=None,
        layer_types: list[str] | None = None,
        layer_mixers: list[str] | None = None,
        mixer_config: dict | None = None,
        method: str | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        if isinstance(base_config, dict):
            base_config = dict(base_config)
            base_type = base_config.pop("model_type", None)
            if base_type is None:
                raise ValueError("base_config needs a 'model_type' (the source architecture, e.g. 'llama')")
            base_config = AutoConfig.for_model(base_type, **base_config)
        n = base_config.num_hidden_layers if base_config is not None else 0
        layer_types = list(layer_types) if layer_types is not None else (
            base_layer_types(base_config) if base_config is not None else []
        )
        layer_mixers = list(layer_mixers) if layer_mixers is not None else ["attention"] * n
        if base_config is not None:
            for name in _MIRRORED:
                if hasattr(base_config, name) and name not in kwargs:
                    kwargs[name] = getattr(base_config, name)
            if tie_word_embeddings is None:
                tie_word_embeddings = getattr(base_config, "tie_word_embeddings", False)
            if len(layer_types) != n or len(layer_mixers) != n:
                raise ValueError(
                    f"layer_types ({len(layer_types)}) and layer_mixers ({len(layer_mixers)}) must have "
                    f"one entry per layer ({n})"
                )
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_rnnify.RnnifyConfig",
                "AutoModelForCausalLM": "modeling_rnnify.RnnifyForCausalLM",
            },
        )
        super().__init__(tie_word_embeddings=bool(tie_word_embeddings), **kwargs)
        # Set after the parent's __init__: its validator only knows transformers' layer types; ours
        # (validate_layer_type below) runs when this __init__ returns.
        self.base_config = base_config
        self.layer_types = layer_types
        self.layer_mixers = layer_mixers
        self.mixer_config = dict(mixer_config or {})
        self.method = method
        self.use_cache = use_cache

    def validate_layer_type(self):
        """transformers' check, extended with the layer types rnnify adds (``hybrid_sliding_sink``)."""
        from transformers.configuration_utils import ALLOWED_ATTN_LAYER_TYPES

        allowed = set(ALLOWED_ATTN_LAYER_TYPES) | set(RNNIFY_LAYER_TYPES)
        bad = [t for t in (getattr(self, "layer_types", None) or []) if t not in allowed]
        if bad:
            raise ValueError(f"layer_types entries {bad} are not known; accepted: {sorted(allowed)}")

    @property
    def base_layer_types(self) -> list[str]:
        return base_layer_types(self.base_config)

    def mixer_settings(self, layer_idx: int) -> dict:
        """Settings of one layer's mixer: the shared ``mixer_config`` with per-layer overrides applied."""
        settings = {k: v for k, v in self.mixer_config.items() if k != "per_layer"}
        settings.update(self.mixer_config.get("per_layer", {}).get(str(layer_idx), {}))
        return settings


__all__ = ["RnnifyConfig", "base_layer_types", "ATTENTION_LAYER_TYPES"]
