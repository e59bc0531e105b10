"""Retrofitted depth recurrence (McLeish, Geiping et al. 2025): the source's layers split into a prelude, a recurrent
block run several times, and a coda; the layers between prelude and block are dropped. An adapter Linear(2d -> d)
injects the prelude's output into the loop state at every loop (``modeling/recurrent_block.py``).

Default split, by the paper's rule (TinyLlama, 22 layers: 0-3 / 10-17 / 18-21; Llama-3.2-1B, 16 layers: 4 / 6 / 4):
prelude and coda of min(4, L // 4) layers each, and a block of round(3L / 8) layers right before the coda.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import RnnifyError
from .base import parse_layer_list, text_config
from .method import Conversion, MethodOptions, Paper, Plan


class RetrofitOptions(MethodOptions):
    prelude: str | None = Field(None, description="prelude layers, e.g. 0-3 (default: the paper's rule)")
    block: str | None = Field(None, description="recurrent block layers, e.g. 18-25; 'none' keeps no block")
    coda: str | None = Field(None, description="coda layers, e.g. 26-29 (default: the paper's rule)")
    recurrence: int = Field(4, ge=1, description="default loop count of the block (a forward / generate() may ask "
                                                 "for another)")
    adapter_init: Literal["random", "passthrough", "damped"] = Field(
        "random", description="random (the paper's); passthrough [0 | I]: one loop is then the source without the "
                              "dropped layers, and every loop the same; damped [I/2 | I/2] (with state_init prelude): "
                              "one loop is that too, and each further loop runs the block on the midpoint of the "
                              "state and its input")
    state_init: Literal["normal", "zeros", "prelude"] = Field(
        "normal", description="loop state before the first loop: truncated normal (the paper's), zeros, or the "
                              "prelude's output")
    state_std: float = Field(1.0, gt=0, description="std of the truncated normal initial state")
    untie_embeddings: bool = Field(False, description="give the LM head its own copy of tied embeddings (the paper "
                                                      "unties)")


def default_split(n: int) -> tuple[list[int], list[int], list[int]]:
    edge = max(1, min(4, n // 4))
    size = max(1, min(round(3 * n / 8), n - 2 * edge))
    coda = list(range(n - edge, n))
    block = list(range(n - edge - size, n - edge))
    return list(range(edge)), block, coda


def split(options: dict, n: int) -> tuple[list[int], list[int], list[int]]:
    """(prelude, block, coda) layer lists: the options', the default rule for those left out; checked."""
    d_pre, d_block, d_coda = default_split(n)
    no_block = str(options.get("block")).strip().lower() in ("none", "")
    pre = parse_layer_list(options["prelude"], n, "--prelude") if options.get("prelude") is not None else d_pre
    block = [] if no_block else (parse_layer_list(options["block"], n, "--block")
                                 if options.get("block") is not None else d_block)
    coda = parse_layer_list(options["coda"], n, "--coda") if options.get("coda") is not None else d_coda
    if no_block and options.get("prelude") is None and options.get("coda") is None:
        pre, coda = list(range(n)), []  # no block and no split given: the source itself
    parts = {"prelude": pre, "block": block, "coda": coda}
    for name, layers in parts.items():
        if layers and layers != list(range(layers[0], layers[-1] + 1)):
            raise RnnifyError(f"--{name} {layers}: accepted: one contiguous range of layers, e.g. 0-3")
    seen: dict[int, str] = {}
    for name, layers in parts.items():
        for i in layers:
            if i in seen:
                raise RnnifyError(f"layer {i} is in both --{seen[i]} and --{name}; the parts must not overlap")
            seen[i] = name
    order = pre + block + coda
    if order != sorted(order):
        raise RnnifyError(f"the parts must come in order prelude < block < coda; got prelude {pre}, block {block}, "
                          f"coda {coda} (this model has layers 0..{n - 1})")
    return pre, block, coda


class Retrofit(Conversion):
    name = "retrofit"
    summary = "retrofitted depth recurrence: prelude / a block of layers looped r times / coda, adapter Linear(2d->d)"
    paper = Paper("Teaching Pretrained Language Models to Think Deeper with Retrofitted Recurrence (McLeish et al., "
                  "2025)", "https://arxiv.org/abs/2511.07384")
    Options = RetrofitOptions
    mixers = ()
    keeps_attention = False
    test_options = {"prelude": "0", "block": "1-2", "coda": "3", "recurrence": 2, "state_init": "zeros"}
    test_variants = {"passthrough": {"adapter_init": "passthrough"}, "prelude_state": {"state_init": "prelude"},
                     "damped": {"adapter_init": "damped", "state_init": "prelude"}}

    def plan(self, source_config, keep_attention, options) -> Plan:
        n = text_config(source_config).num_hidden_layers
        pre, block, coda = split(options, n)
        if options["adapter_init"] == "damped" and options["state_init"] != "prelude":
            raise RnnifyError(f"adapter_init damped averages the loop state with the block's input; it needs "
                              f"state_init prelude (the state starts as that input), not {options['state_init']!r}")
        program = [{"layer": i, "mixer": "attention"} for i in pre]
        if block:
            program.append({"block": [{"layer": i, "mixer": "attention"} for i in block],
                            "loops": options["recurrence"], "adapter": "concat_linear",
                            "adapter_init": options["adapter_init"], "state_init": options["state_init"],
                            "state_std": options["state_std"]})
        program += [{"layer": i, "mixer": "attention"} for i in coda]
        return Plan(program, {})

    def check_source(self, source_config) -> None:
        if text_config(source_config).num_hidden_layers < 2:
            raise RnnifyError("retrofit needs a source with at least 2 layers")

    def finish(self, student, options) -> None:
        if options["untie_embeddings"] and student.config.tie_word_embeddings:
            with torch.no_grad():
                student.lm_head.weight = torch.nn.Parameter(student.model.embed_tokens.weight.detach().clone())
            student.config.tie_word_embeddings = False
            student.config.base_config.tie_word_embeddings = False


METHOD = Retrofit()
