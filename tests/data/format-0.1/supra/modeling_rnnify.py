"""RnnifyForCausalLM: a source causal LM whose token mixers are swapped per layer.

The source family's own model (embeddings, decoder layers, MLPs, norms, rotary embedding) is built from
``config.base_config`` and kept under ``self.model`` with the source's parameter names; only
``model.layers[i].self_attn`` is replaced for converted layers. Our forward walks the layers itself so that
the cache follows ``config.layer_types`` (transformers' DynamicCache builds the right layer per type) and
masks are made only for the attention layers that remain.

Only torch/transformers and sibling files are imported: this file ships with converted models.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_rnnify import RnnifyConfig
from .mixers import MIXERS, get_mixer

# transformers renamed `past_key_values` to `cache` (5.2x); support both spellings of the output field.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


REMOTE_CODE_FILES = ("configuration_rnnify.py", "modeling_rnnify.py", "mixers.py", "sink_window_cache.py")


def remote_code_sources() -> dict[str, Path]:
    """Files to copy next to a saved model (this file's siblings; the kernel reference is shipped beside them)."""
    here = Path(__file__).resolve().parent
    files = {name: here / name for name in REMOTE_CODE_FILES}
    shipped = here / "kernels_reference.py"
    files["kernels_reference.py"] = shipped if shipped.exists() else here.parent / "kernels" / "reference.py"
    return files


class RnnifyPreTrainedModel(PreTrainedModel):
    config_class = RnnifyConfig
    config: RnnifyConfig
    base_model_prefix = "rnnify"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config, plus the modeling code so ``trust_remote_code=True`` loads it anywhere."""
        super().save_pretrained(save_directory, *args, **kwargs)
        for name, src in remote_code_sources().items():
            shutil.copyfile(src, Path(save_directory) / name)

    def _init_weights(self, module):
        if hasattr(module, "init_new_parameters"):
            module.init_new_parameters()
        elif getattr(self, "model", None) is not None and hasattr(self.model, "_init_weights"):
            self.model._init_weights(module)


class RnnifyForCausalLM(RnnifyPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RnnifyConfig):
        super().__init__(config)
        base = config.base_config
        attn_impl = getattr(config, "_attn_implementation", None)
        if attn_impl is not None:
            base._attn_implementation = attn_impl
        self.model = AutoModel.from_config(base)
        self._no_split_modules = [type(self.model.layers[0]).__name__]
        for i, mixer in enumerate(config.layer_mixers):
            if mixer == "attention":
                continue
            layer = self.model.layers[i]
            layer.self_attn = get_mixer(mixer)(config, i, layer.self_attn)
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        params = inspect.signature(type(self.model.layers[0]).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        rotary = getattr(self.model, "rotary_emb", None)
        self._rotary_takes_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        self.post_init()

    # -- helpers ---------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def mixers(self):
        """(layer index, mixer) for every converted layer."""
        return [(i, l.self_attn) for i, l in enumerate(self.model.layers) if type(l.self_attn).__name__ in
                {c.__name__ for c in MIXERS.values()}]

    def new_parameter_names(self) -> list[str]:
        """Full names of the parameters the conversion created (the ones distillation trains first)."""
        names = []
        for i, m in self.mixers():
            names += [f"model.layers.{i}.self_attn.{n}" for n in m.new_parameter_names()]
        return names

    def _past_length(self, cache) -> int:
        if cache is None:
            return 0
        for i, t in enumerate(self.config.layer_types):
            if t in _MASK_FUNCTIONS and i < len(cache.layers):
                return cache.get_seq_length(i)
        return getattr(cache, "rnnify_seen_tokens", 0)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        output_hidden_states=None,
        past_key_values=None,
        **kwargs,
    ):
        if cache is None:
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and cache is None:
            use_cache = False
        inner = self.model
        if inputs_embeds is None:
            inputs_embeds = inner.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        T = inputs_embeds.shape[1]
        past = self._past_length(cache)
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0)

        base = self.config.base_config
        layer_types, base_types = self.config.layer_types, self.config.base_layer_types
        masks = {}
        if not isinstance(attention_mask, dict):
            for kind, fn in _MASK_FUNCTIONS.items():
                if kind in layer_types:
                    masks[kind] = fn(
                        config=base, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        cache=cache, position_ids=position_ids, layer_idx=layer_types.index(kind),
                    )
            mixer_mask = attention_mask
        else:  # masks prepared by the caller
            masks, mixer_mask = attention_mask, attention_mask.get("padding")

        hidden = inputs_embeds
        rope = {}
        for kind in set(base_types):
            if self._rotary_takes_type:
                rope[kind] = inner.rotary_emb(hidden, position_ids, kind)
            else:
                rope[kind] = inner.rotary_emb(hidden, position_ids)
                break
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(inner.layers[: self.config.num_hidden_layers]):
            if all_hidden is not None:
                all_hidden.append(hidden)
            out = layer(
                hidden,
                attention_mask=masks.get(layer_types[i], mixer_mask),
                position_embeddings=rope.get(base_types[i], next(iter(rope.values()))),
                position_ids=position_ids,
                use_cache=use_cache,
                **{self._cache_kw: cache},
                **kwargs,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = inner.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        if cache is not None:
            cache.rnnify_seen_tokens = past + T

        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        cap = getattr(base, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{_CACHE_FIELD: cache if use_cache else None},
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


__all__ = ["RnnifyForCausalLM", "RnnifyPreTrainedModel"]
