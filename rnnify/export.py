"""Export a Mamba-in-the-Llama hybrid to transformers' in-tree Bamba architecture (Mamba2 + attention layers),
so it also runs where only in-tree architectures run (vLLM, SGLang).

The mapping is exact when every layer is either attention or Mamba2 and the source is Llama-shaped:
Bamba's Mamba2 uses one B/C group per head (n_groups = heads) and x of heads x head_dim, so our x and B rows
(per KV head, repeated for GQA at run time) are repeated in in_proj and conv1d ahead of time - a depthwise
conv over repeated channels gives the same values. Bamba's attention gets the full rotary dimension
(``partial_rotary_factor: 1.0`` in ``rope_parameters``; its config otherwise defaults to 0.5).
"""

from __future__ import annotations

import torch
from transformers import BambaConfig, BambaForCausalLM

from .errors import RnnifyError
from .modeling.mixer_mamba2 import Mamba2Mixer


def _check(student):
    cfg = student.config
    base = cfg.base_config
    problems = []
    looped = list(getattr(student, "blocks", []))
    if looped:  # retrofit: Bamba runs each layer once, in order, with nothing between them
        spec = looped[0].spec
        problems.append(f"a block of layers run {spec.loops} times with an input adapter (retrofitted recurrence: "
                        "Bamba runs each layer once and has no adapter or loop count)")
    if "dropped" in cfg.layer_mixers:
        problems.append(f"dropped layers {[i for i, m in enumerate(cfg.layer_mixers) if m == 'dropped']} (Bamba runs "
                        "every layer)")
    if any(m not in ("attention", Mamba2Mixer.name, "dropped") for m in cfg.layer_mixers):
        problems.append(f"mixers {sorted(set(cfg.layer_mixers))} (Bamba has only attention and Mamba2 layers)")
    if base.model_type not in ("llama", "mistral", "qwen2"):
        problems.append(f"base architecture {base.model_type} (Bamba layers are Llama-shaped: no q/k norms)")
    if any(t != "full_attention" for t in cfg.base_layer_types):
        problems.append("sliding-window attention layers (Bamba's attention is full)")
    heads, head_dim = base.num_attention_heads, getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    if (heads * head_dim) % base.hidden_size:
        problems.append(f"heads x head_dim = {heads * head_dim} is not a multiple of hidden_size {base.hidden_size}")
    if getattr(base, "hidden_act", "silu") != "silu":
        problems.append(f"activation {base.hidden_act}")
    mixers = [m for _, m in student.mixers() if isinstance(m, Mamba2Mixer)]
    if mixers and len({m.conv_kernel for m in mixers}) > 1:
        problems.append("different conv kernels per layer")
    if mixers and len({m.d_state for m in mixers}) > 1:
        problems.append("different state sizes per layer (Bamba has one d_state)")
    if any(abs(m.norm.eps - base.rms_norm_eps) > 1e-12 for m in mixers):
        problems.append("Mamba2 norm epsilon differs from rms_norm_eps (Bamba uses one epsilon)")
    if problems:
        raise RnnifyError("cannot export to Bamba: " + "; ".join(problems))


def bamba_config(student):
    cfg, base = student.config, student.config.base_config
    heads, kv = base.num_attention_heads, base.num_key_value_heads
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // heads
    mixers = [m for _, m in student.mixers()]
    rope = dict(getattr(base, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    rope["partial_rotary_factor"] = 1.0
    attention_bias = bool(getattr(base, "attention_bias", False)) or base.model_type == "qwen2"
    return BambaConfig(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv,
        rms_norm_eps=base.rms_norm_eps, max_position_embeddings=base.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_layer_indices=[i for i, m in enumerate(cfg.layer_mixers) if m == "attention"],
        mamba_n_heads=heads, mamba_d_head=head_dim, mamba_n_groups=heads, mamba_d_state=mixers[0].d_state if mixers else head_dim,
        mamba_d_conv=mixers[0].conv_kernel if mixers else 4, mamba_expand=heads * head_dim // base.hidden_size,
        mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=bool(mixers and mixers[0].in_proj.bias is not None),
        attention_bias=attention_bias, mlp_bias=bool(getattr(base, "mlp_bias", False)), rope_parameters=rope,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
    )


def _expand_heads(rows: torch.Tensor, kv: int, rep: int) -> torch.Tensor:
    """[kv * d, ...] rows -> [kv * rep * d, ...]: each KV head's block repeated for its query heads."""
    return rows.view(kv, 1, -1, *rows.shape[1:]).expand(kv, rep, -1, *rows.shape[1:]).reshape(-1, *rows.shape[1:])


@torch.no_grad()
def to_bamba(student):
    """A ``BambaForCausalLM`` with the student's weights (raises RnnifyError when they do not map)."""
    _check(student)
    config = bamba_config(student)
    bamba = BambaForCausalLM(config).to(next(student.parameters()).dtype).eval()
    src = student.model
    dst = bamba.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.final_layernorm.weight.copy_(src.norm.weight)
    if not config.tie_word_embeddings:
        bamba.lm_head.weight.copy_(student.lm_head.weight)
    for i, (s, d) in enumerate(zip(src.layers, dst.layers)):
        d.input_layernorm.weight.copy_(s.input_layernorm.weight)
        d.pre_ff_layernorm.weight.copy_(s.post_attention_layernorm.weight)
        d.feed_forward.load_state_dict(s.mlp.state_dict())
        if student.config.layer_mixers[i] == "attention":
            sd = s.self_attn.state_dict()
            for name, w in d.self_attn.state_dict().items():
                (w.copy_(sd[name]) if name in sd else w.zero_())  # Bamba may carry an o_proj bias Qwen2 lacks
            continue
        m, b = s.self_attn, d.mamba
        kv, rep = m.num_kv_heads, m.num_heads // m.num_kv_heads
        zr, xr, br, cr, dr = torch.split(m.in_proj.weight, m._split(), 0)
        b.in_proj.weight.copy_(torch.cat([zr, _expand_heads(xr, kv, rep), _expand_heads(br, kv, rep), cr, dr]))
        if m.in_proj.bias is not None:
            zb, xb, bb, cb, db = torch.split(m.in_proj.bias, m._split(), 0)
            b.in_proj.bias.copy_(torch.cat([zb, _expand_heads(xb, kv, rep), _expand_heads(bb, kv, rep), cb, db]))
        cw, cbias = m.conv1d.weight, m.conv1d.bias
        parts_w = torch.split(cw, [m.d_xb, m.d_b, m.d_c], 0)
        parts_b = torch.split(cbias, [m.d_xb, m.d_b, m.d_c], 0)
        b.conv1d.weight.copy_(torch.cat([_expand_heads(parts_w[0], kv, rep), _expand_heads(parts_w[1], kv, rep), parts_w[2]]))
        b.conv1d.bias.copy_(torch.cat([_expand_heads(parts_b[0], kv, rep), _expand_heads(parts_b[1], kv, rep), parts_b[2]]))
        b.dt_bias.copy_(m.dt_bias)
        b.A_log.copy_(m.A_log)
        b.D.copy_(m.D)
        b.norm.weight.copy_(m.norm.weight)
        b.out_proj.weight.copy_(m.out_proj.weight)
        if b.out_proj.bias is not None:
            b.out_proj.bias.copy_(m.out_proj.bias if m.out_proj.bias is not None else torch.zeros_like(b.out_proj.bias))
    bamba.generation_config = student.generation_config
    check_same_logits(student, bamba)
    return bamba


@torch.no_grad()
def check_same_logits(student, exported, length: int = 48):
    """Refuse an export whose logits are not the student's on a random sequence: whatever the checks above miss
    (a setting the target cannot hold) shows here, before anything is written. Tolerance: float rounding of the
    other kernel order (relative 1e-4 of the largest logit in float32, 2e-2 in 16-bit types)."""
    param = next(student.parameters())
    vocab = student.config.base_config.vocab_size
    x = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0)).to(param.device)
    a = student(input_ids=x, use_cache=False).logits.float()
    b = exported(input_ids=x, use_cache=False).logits.float()
    rel = 1e-4 if param.dtype == torch.float32 else 2e-2
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    if not diff <= rel * scale + 1e-5:
        raise RnnifyError(f"cannot export to {type(exported).__name__}: its logits differ from the model's by up to "
                          f"{diff:.3g} (largest logit {scale:.3g}); the target cannot hold this model")
