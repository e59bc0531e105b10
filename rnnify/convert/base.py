"""What every conversion shares: checking the source, parsing layer lists, copying weights into the student."""

from __future__ import annotations

import contextlib

import torch

from ..errors import RnnifyError
from ..modeling import RnnifyConfig, RnnifyForCausalLM
from ..modeling.layer_program import DROPPED
from .method import Plan

# Source families whose decoder layers follow the frame the student reuses (self_attn with q/k/v/o
# projections, rotate-half RoPE from model.rotary_emb).
SUPPORTED_MODEL_TYPES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_supported(config) -> None:
    cfg = text_config(config)
    mt = getattr(cfg, "model_type", None)
    if mt == "rnnify":
        raise RnnifyError("the source is already an rnnify model; convert its base model instead, or give a "
                          "transform method (see rnnify ls)")
    if mt not in SUPPORTED_MODEL_TYPES:
        arch = ",".join(getattr(config, "architectures", None) or [mt or "?"])
        raise RnnifyError(
            f"unsupported architecture {mt!r} ({arch}); rnnify converts: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def parse_layer_list(spec, num_layers: int, what: str = "--keep-attention") -> list[int]:
    """Parse '0,15' / '0-3,15' / [0, 15] / '-1' into sorted layer indices, checking the range."""
    if spec is None or spec == "" or spec == []:
        return []
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        try:
            if isinstance(item, int):
                idx = [item]
            elif "-" in text[1:]:
                a, b = text.split("-", 1) if not text.startswith("-") else (text, "")
                idx = list(range(int(a), int(b) + 1))
            else:
                idx = [int(text)]
        except ValueError:
            raise RnnifyError(f"{what}: {text!r} is not a layer index; accepted: comma-separated integers or "
                              "ranges like 0-3") from None
        for i in idx:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise RnnifyError(f"{what}: layer {i} is out of range; this model has layers 0..{num_layers - 1}")
            out.add(j)
    return sorted(out)


def build_student(teacher, plan: Plan, method: str) -> RnnifyForCausalLM:
    """Make the student from the teacher: same weights where names match, new parts initialised by their mixers."""
    check_supported(teacher.config)
    base = text_config(teacher.config)
    base_dict = base.to_dict()
    base_dict.pop("quantization_config", None)
    config = RnnifyConfig(base_config=base_dict, program=plan.program, mixer_config=plan.mixer_config, method=method)
    config._attn_implementation = getattr(base, "_attn_implementation", None) or "sdpa"
    dtype = next(teacher.parameters()).dtype
    # a teacher on the meta device (shapes only, for a memory plan): the student too, nothing copied or initialised
    meta = next(teacher.parameters()).is_meta
    with torch.device("meta") if meta else contextlib.nullcontext():
        student = RnnifyForCausalLM(config).to(dtype)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False, assign=meta)
    new = set(student.new_parameter_names())
    mixers = student.mixers()
    new_buffers = {f"model.layers.{i}.self_attn.{n}" for i, m in mixers for n, _ in m.named_buffers()}
    # what the program leaves out: the attention modules a mixer absorbs, and the dropped layers
    left_out = tuple(f"model.layers.{i}.self_attn.{name}." for i, m in mixers for name in m.absorbs)
    left_out += tuple(f"model.layers.{i}." for i, mixer in enumerate(config.layer_mixers) if mixer == DROPPED)
    missing = [k for k in missing if k not in new and k not in new_buffers and not k.endswith("inv_freq")]
    unexpected = [k for k in unexpected if not k.endswith("inv_freq") and not k.startswith(left_out)]
    if missing or unexpected:
        raise RnnifyError(
            f"weights of {getattr(base, 'model_type', '?')} do not map onto the student: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if meta:
        student.generation_config = teacher.generation_config
        return student
    for i, m in mixers:
        m.init_new_parameters()
        m.init_from_attention(teacher.model.layers[i].self_attn)
    for block in student.blocks:
        block.init_new_parameters()
    student.generation_config = teacher.generation_config
    student.eval()
    return student


@torch.no_grad()
def count_new_parameters(student) -> int:
    names = set(student.new_parameter_names())
    return sum(p.numel() for n, p in student.named_parameters() if n in names)
