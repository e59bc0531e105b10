"""RnnifyForCausalLM: a source causal LM run by a layer program (``layer_program.py``).

The source family's own model (embeddings, decoder layers, MLPs, norms, rotary embedding) is built from
``config.base_config`` and kept under ``self.model`` with the source's parameter names. A step's token mixer
replaces ``model.layers[i].self_attn`` (``attention`` steps keep the source layer untouched); layers the program
does not run are replaced by an empty placeholder (their weights are not part of the model); a block's adapters
live in ``self.blocks``. The forward interprets the program: the cache follows ``config.layer_types``
(transformers' DynamicCache builds the right layer per type), a looped step's further executions get cache slots
of their own, and masks are made only for the attention layers that remain.

Only torch/transformers and sibling files are imported: this file ships with converted models.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_rnnify import RnnifyConfig
from .generation_cache import RnnifyCache, as_rnnify_cache, cache_keyword
from .layer_program import ATTENTION, DROPPED, Block, CacheSlots, blocks, every_step, parse
from .mixer_base import Mixer
from .mixers import get_mixer
from .recurrent_block import LoopBlock, catch_up_slot
from .remote_code import remote_code_sources

_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class DroppedLayer(nn.Module):
    """Stands in for a source layer the program does not run (keeps the other layers' indices and names)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this source layer was dropped by the conversion; the layer program never runs it")


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
        if isinstance(module, (Mixer, LoopBlock)):
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
        # parsed with this file's own layer_program: loaded as remote code, the config class may come from another
        # copy of it (isinstance checks must see one Block class)
        self.program = parse(config.program, base.num_hidden_layers)
        for step in every_step(self.program):
            if step.mixer != ATTENTION:
                layer = self.model.layers[step.layer]
                layer.self_attn = get_mixer(step.mixer)(config, step.layer, layer.self_attn, config.step_settings(step))
        for i, mixer in enumerate(config.layer_mixers):
            if mixer == DROPPED:
                self.model.layers[i] = DroppedLayer()
        self.blocks = nn.ModuleList([LoopBlock(b, base.hidden_size) for b in blocks(self.program)])
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        layer_cls = next(type(layer) for layer in self.model.layers if not isinstance(layer, DroppedLayer))
        self._cache_kw = cache_keyword(layer_cls.forward)
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

    def mixers(self) -> list[tuple[int, Mixer]]:
        """(source layer index, mixer) for every converted layer, in layer order."""
        return [(i, layer.self_attn) for i, layer in enumerate(self.model.layers)
                if isinstance(getattr(layer, "self_attn", None), Mixer)]

    def new_parameter_names(self) -> list[str]:
        """Full names of the parameters the conversion created (the ones distillation trains first)."""
        names = []
        for i, m in self.mixers():
            names += [f"model.layers.{i}.self_attn.{n}" for n in m.new_parameter_names()]
        for b, block in enumerate(self.blocks):
            names += [f"blocks.{b}.{n}" for n, _ in block.named_parameters()]
        return names

    def set_source_view(self, on: bool = True) -> None:
        """Run every converted layer as the source attention it replaced (full causal softmax, no memory): the
        teacher of self-distillation, held in the same weights. Only mixers that keep the source's projections can."""
        mixers = self.mixers()
        cannot = sorted({m.name for _, m in mixers if not m.can_run_as_source})
        if cannot:
            raise ValueError(f"mixers {cannot} cannot run as the source attention (their projections are not the "
                             "source's); self-distillation needs window-family mixers (window, lolcats, ahn)")
        for _, m in mixers:
            m.as_source = on

    def default_recurrence(self) -> int | None:
        """The loop count of the first block (None when the program has no block)."""
        return self.blocks[0].spec.loops if len(self.blocks) else None

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
        recurrence: int | None = None,
        backprop_loops: int | None = None,
        **kwargs,
    ):
        """``recurrence``: loops of each block for this call (default: the block's ``loops``); ``backprop_loops``:
        only the last k loops keep gradients (truncated backpropagation through the loops; default all)."""
        if cache is None:
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if recurrence is not None and (not isinstance(recurrence, int) or recurrence < 1):
            raise ValueError(f"recurrence must be an integer >= 1 (loops of the recurrent block), got {recurrence!r}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and cache is None:
            use_cache = False
        inner = self.model
        if inputs_embeds is None:
            inputs_embeds = inner.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = RnnifyCache(config=self.config)
        cache = as_rnnify_cache(cache)
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

        rope = {}
        for kind in set(base_types):
            if self._rotary_takes_type:
                rope[kind] = inner.rotary_emb(inputs_embeds, position_ids, kind)
            else:
                rope[kind] = inner.rotary_emb(inputs_embeds, position_ids)
                break
        if cache is not None and not hasattr(cache, "rnnify_slots"):
            cache.rnnify_slots = CacheSlots(len(layer_types))
        run = _StepRunner(self, cache, masks, mixer_mask, rope, position_ids, use_cache, past + T, kwargs)

        hidden = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        n_block = 0
        for item in self.program:
            if isinstance(item, Block):
                hidden = self._run_block(self.blocks[n_block], hidden, run, recurrence, backprop_loops, past)
                n_block += 1
                continue
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden = run(item, hidden, loop=0)
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
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    def _run_block(self, block: LoopBlock, inputs, run, recurrence, backprop_loops, past):
        """Run a block ``loops`` times: s <- adapter(s, inputs); s <- block(s). Loops before the last
        ``backprop_loops`` run without gradients (truncated backpropagation, McLeish et al. 2025 sec. 3)."""
        loops = recurrence if recurrence is not None else block.spec.loops
        keep_grad = loops if backprop_loops is None else min(loops, max(0, int(backprop_loops)))
        if run.cache is not None:  # before any loop runs: slots of loops that missed earlier tokens catch up
            for j in range(1, loops):
                for step in block.spec.steps:
                    catch_up_slot(run.cache, run.slot(step, j), [run.slot(step, i) for i in range(j)], past)
        state = block.initial_state(inputs, run.position_ids)
        for j in range(loops):
            ctx = contextlib.nullcontext() if j >= loops - keep_grad else torch.no_grad()
            with ctx:
                state = block.combine(state, inputs)
                for step in block.spec.steps:
                    state = run(step, state, loop=j)
        return state


class _StepRunner:
    """Runs one program step on the hidden states, in the cache slot of its (layer, loop)."""

    def __init__(self, model, cache, masks, mixer_mask, rope, position_ids, use_cache, end, kwargs):
        self.model, self.cache, self.masks, self.mixer_mask = model, cache, masks, mixer_mask
        self.rope, self.position_ids, self.use_cache, self.kwargs = rope, position_ids, use_cache, kwargs
        self.end = end  # tokens every slot run by this call will have processed
        self.layer_types = model.config.layer_types
        self.base_types = model.config.base_layer_types

    def slot(self, step, loop: int) -> int:
        if self.cache is None:
            return step.layer
        slot = self.cache.rnnify_slots.slot(step.layer, loop)
        while len(self.cache.layers) <= slot:  # a further loop's slot: a fresh layer of the step's type
            self.cache.layers.append(_new_cache_layer(self.model.config, self.layer_types[step.layer]))
        return slot

    def __call__(self, step, hidden, loop: int):
        layer = self.model.model.layers[step.layer]
        attn = layer.self_attn
        slot = self.slot(step, loop)
        own = getattr(attn, "layer_idx", slot)
        if own != slot:  # transformers' attention and our mixers address the cache by layer_idx
            attn.layer_idx = slot
        try:
            out = layer(
                hidden,
                attention_mask=self.masks.get(self.layer_types[step.layer], self.mixer_mask),
                position_embeddings=self.rope.get(self.base_types[step.layer], next(iter(self.rope.values()))),
                position_ids=self.position_ids,
                use_cache=self.use_cache,
                **{self.model._cache_kw: self.cache},
                **self.kwargs,
            )
        finally:
            if own != slot:
                attn.layer_idx = own
        if self.cache is not None:
            self.cache.rnnify_slots.seen[slot] = self.end
        return out[0] if isinstance(out, tuple) else out


def _new_cache_layer(config, layer_type: str):
    kwargs = {"sliding_window": config.sliding_window} if layer_type == "sliding_attention" else {}
    return DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs)


__all__ = ["RnnifyForCausalLM", "RnnifyPreTrainedModel"]
