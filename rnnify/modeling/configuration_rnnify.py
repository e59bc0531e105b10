"""Configuration of a converted (recurrent, hybrid or looped) model.

A converted model keeps its source ("base") architecture for everything but what the layer program changes. The
base config is stored whole under ``base_config`` (a transformers sub-config, so ``attn_implementation`` and dtype
propagate). ``program`` (``layer_program.py``) is the ordered list of steps the forward executes: a source layer
with its token mixer (``attention`` = the source layer untouched), or a block of them run several times; layers no
step names are dropped. ``mixer_config`` holds the settings shared by the mixers (a step's ``settings`` override
them), ``method`` the conversion and ``transforms`` the rewrites applied after it.

``layer_types`` (one cache layer type per source layer, transformers' names where they fit, ``dummy`` for dropped
layers) is derived from the program, because transformers' ``DynamicCache(config=...)`` reads it.

Models saved by rnnify 0.1 stored ``layer_mixers`` (+ ``mixer_config['per_layer']``) instead of a program; they
load unchanged.

Only transformers and sibling files are imported here: this file is copied next to converted models for
``trust_remote_code``.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import ALLOWED_ATTN_LAYER_TYPES

from .layer_program import ATTENTION, every_step, from_layer_mixers, parse, to_json
from .layer_program import layer_mixers as program_layer_mixers
from .mixers import get_mixer

# Attention layer types of the base model that a kept layer may have.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

# Layer types rnnify adds to transformers' own (cache layers registered in sink_window_cache.py) and the
# placeholder of dropped layers (transformers' DummyLayer).
RNNIFY_LAYER_TYPES = ("sliding_sink_attention", "hybrid_sliding_sink", "dummy")

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
        program: list | None = None,
        mixer_config: dict | None = None,
        method: str | None = None,
        transforms: list | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool | None = None,
        layer_types: list[str] | None = None,  # derived from the program; accepted (and ignored) when loading
        layer_mixers: list[str] | None = None,  # rnnify 0.1's per-layer mixer list
        **kwargs,
    ):
        if isinstance(base_config, dict):
            base_config = dict(base_config)
            base_type = base_config.pop("model_type", None)
            if base_type is None:
                raise ValueError("base_config needs a 'model_type' (the source architecture, e.g. 'llama')")
            base_config = AutoConfig.for_model(base_type, **base_config)
        mixer_config = dict(mixer_config or {})
        n = base_config.num_hidden_layers if base_config is not None else 0
        if program is None and layer_mixers is not None:
            if len(layer_mixers) != n:
                raise ValueError(f"layer_mixers has {len(layer_mixers)} entries, the base model {n} layers")
            program = from_layer_mixers(layer_mixers, mixer_config)
        mixer_config.pop("per_layer", None)  # 0.1's per-layer settings live in the program's steps now
        if program is None:
            program = [{"layer": i, "mixer": ATTENTION} for i in range(n)]
        if base_config is not None:
            program = to_json(parse(program, n))
            for name in _MIRRORED:
                if hasattr(base_config, name) and name not in kwargs:
                    kwargs[name] = getattr(base_config, name)
            if tie_word_embeddings is None:
                tie_word_embeddings = getattr(base_config, "tie_word_embeddings", False)
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
        self.program = program
        self.mixer_config = mixer_config
        self.method = method
        self.transforms = list(transforms or [])
        self.use_cache = use_cache
        self.layer_types = self._derive_layer_types() if base_config is not None else []

    # ---- the program --------------------------------------------------------------------------------------
    def parsed_program(self) -> list:
        return parse(self.program, self.base_config.num_hidden_layers)

    def _derive_layer_types(self) -> list[str]:
        base_types = base_layer_types(self.base_config)
        types = ["dummy"] * len(base_types)
        for step in every_step(self.parsed_program()):
            types[step.layer] = base_types[step.layer] if step.mixer == ATTENTION else get_mixer(step.mixer).layer_type
        return types

    @property
    def layer_mixers(self) -> list[str]:
        """Mixer per source layer (``attention``, a mixer name, or ``dropped``)."""
        return program_layer_mixers(self.parsed_program(), self.base_config.num_hidden_layers)

    @property
    def base_layer_types(self) -> list[str]:
        return base_layer_types(self.base_config)

    def step_settings(self, step) -> dict:
        """Settings of one step's mixer: the shared ``mixer_config`` with the step's own settings applied."""
        return {**self.mixer_config, **step.settings}

    def validate_layer_type(self):
        """transformers' check, extended with the layer types rnnify adds."""
        allowed = set(ALLOWED_ATTN_LAYER_TYPES) | set(RNNIFY_LAYER_TYPES)
        bad = [t for t in (getattr(self, "layer_types", None) or []) if t not in allowed]
        if bad:
            raise ValueError(f"layer_types entries {bad} are not known; accepted: {sorted(allowed)}")


__all__ = ["RnnifyConfig", "base_layer_types", "ATTENTION_LAYER_TYPES"]
