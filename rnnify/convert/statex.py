"""StateX (Shen et al. 2025, "StateX: Enhancing RNN Recall via Post-training State Expansion", arXiv 2509.22630):
enlarge the recurrent state of an already-recurrent model, then post-train it briefly on long sequences.

A transform: it takes an rnnify model (or transformers' own ``Mamba2ForCausalLM``) and rewrites chosen layers.

* Linear-attention layers (``supra``, LoLCATs' linear branch, AHN's memory): the heads are merged into one head with
  H x D keys and values (sec. 3.1), so the state grows H-fold with no new parameters (KV heads are repeated to the
  query heads at run time). ``init: paper`` re-initialises the merged layers' mixer and their input norm, as the paper
  does (for LoLCATs and AHN, whose q/k/v/o also serve the softmax window, only the linear branch / memory);
  ``keep`` keeps the weights (the merged head is the concatenation of the old ones).
* Mamba2 layers: ``d_state`` is multiplied (sec. 3.2). ``paper``: the in_proj rows of z, x and dt and the x channels
  of the conv are copied, B/C rows and conv channels are fresh, ``A_log`` is reset to log(1..H) and ``dt_bias`` and
  the gated norm to their initial values. ``merge_copy`` tiles the old B/C, ``merge_zero`` pads them with zeros (zero
  B and C rows give each other no gradient: the new state stays unused however long it trains), and
  ``preserve`` (ours, for small post-training budgets) keeps A, dt and the norm and adds random B rows with zero C
  rows, the new conv channels copying the old ones (their bias zero for C), so the expanded model computes exactly
  what it did before expansion and the new C rows take a gradient from the first step.
  ``merge_heads`` (ours: sec. 3.1's head merge carried to d_state) gives each head's new state rows the B rows of the
  next KV groups and the C rows of the heads that read them (head h + j H/G for block j): every head's score becomes
  the sum of ``state_multiplier`` heads' scores (C_h.B_g + C_{h+H/G}.B_{g+1} + ...), as a merged linear-attention
  head's q.k sums its heads' scores, so the larger state is read from the first step with no random rows.

Which layers: ``every:K`` (every K-th expandable layer, the last of each group of K; the paper expands every 6th),
``all``, or a list of layer indices. transformers' Mamba2 has one state size for every layer: there, all of them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from transformers import Mamba2ForCausalLM

from ..errors import RnnifyError
from ..modeling import RnnifyConfig, RnnifyForCausalLM
from ..modeling.mixers import MIXERS
from .base import parse_layer_list
from .method import MethodOptions, Paper, Transform

# the initialisations each kind of expansion (a mixer's ``state_expansion``) accepts
INITS = {"merge_heads": ("paper", "keep"),
         "d_state": ("paper", "merge_copy", "merge_zero", "preserve", "merge_heads")}


class StatexOptions(MethodOptions):
    layers: str | None = Field(None, description="which recurrent layers: every:K, all, or a list like 5,11 (default: "
                                                 "every 6th; all for transformers' Mamba2)")
    state_multiplier: int | None = Field(
        None, ge=2, le=64, description="Mamba2 layers: multiply d_state by this (default 4, at most 64: the state and the "
                                       "new B/C rows grow with it); merged heads grow by the head count")
    init: Literal["paper", "keep", "merge_copy", "merge_zero", "preserve", "merge_heads"] = Field(
        "paper", description="initialisation of the expanded layers (see `rnnify ls`: paper, keep for merged heads; "
                             "paper, merge_copy, merge_zero, preserve, merge_heads for Mamba2)")


def _kind(mixer) -> str | None:
    return mixer.state_expansion


def pick_layers(candidates: list[int], spec: str | None, num_layers: int, default_every: int = 6) -> list[int]:
    """The layers to expand among ``candidates`` (the expandable ones, in order)."""
    spec = spec if spec is not None else f"every:{default_every}"
    text = str(spec).strip().lower()
    if text == "all":
        return list(candidates)
    if text.startswith("every:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise RnnifyError(f"--layers {spec!r}: accepted: every:K with K >= 1, all, or a list like 5,11")
        return [c for j, c in enumerate(candidates) if j % k == k - 1] or candidates[-1:]
    chosen = parse_layer_list(spec, num_layers, "--layers")
    bad = [i for i in chosen if i not in candidates]
    if bad:
        raise RnnifyError(f"--layers: layers {bad} have no recurrent state to expand; expandable: "
                          f"{candidates or 'none'}")
    return chosen


# ------------------------------------------------------------------------------------------ Mamba2 surgery
def expand_bc(in_w, in_b, conv_w, conv_b, sizes: dict, groups_b: int, groups_c: int, n: int, mult: int, init: str,
              generator: torch.Generator):
    """in_proj rows [z, x, B (groups_b x n), C (groups_c x n), dt] and depthwise conv channels [x, B, C] with every
    group's n state rows grown to n * mult. Returns the new (in_w, in_b, conv_w, conv_b)."""
    z, x, dt = sizes["z"], sizes["x"], sizes["dt"]
    d = in_w.shape[1]
    nb, nc = groups_b * n, groups_c * n
    w_z, w_x, w_b, w_c, w_dt = torch.split(in_w, [z, x, nb, nc, dt], 0)
    cw_x, cw_b, cw_c = torch.split(conv_w, [x, nb, nc], 0)
    cb_x, cb_b, cb_c = torch.split(conv_b, [x, nb, nc], 0) if conv_b is not None else (None, None, None)
    bound, cbound = 1 / math.sqrt(d), 1 / math.sqrt(conv_w.shape[-1])

    def grow(rows, groups, fresh_bound, new_part):  # rows [groups * n, ...] -> [groups * n * mult, ...]
        old = rows.reshape(groups, n, *rows.shape[1:])
        extra_shape = (groups, n * (mult - 1), *rows.shape[1:])
        if new_part == "tile":
            new = old.repeat(1, mult - 1, *([1] * (rows.dim() - 1)))
        elif new_part == "zero":
            new = old.new_zeros(extra_shape)
        else:  # random
            new = (torch.rand(extra_shape, generator=generator) * 2 - 1).to(old) * fresh_bound
        return torch.cat([old, new], 1).reshape(groups * n * mult, *rows.shape[1:])

    def fresh(rows, groups, fresh_bound):
        shape = (groups * n * mult, *rows.shape[1:])
        return (torch.rand(shape, generator=generator) * 2 - 1).to(rows) * fresh_bound

    def merged(rows, groups, step):  # block j of group i: group (i + j * step) mod groups's rows
        old = rows.reshape(groups, n, *rows.shape[1:])
        order = [(torch.arange(groups) + j * step) % groups for j in range(mult)]
        return torch.cat([old[o] for o in order], 1).reshape(groups * n * mult, *rows.shape[1:])

    step = groups_c // groups_b  # merge_heads: B group g + j pairs with C of head h + j * step (the module doc)
    if init == "merge_heads":
        if mult > groups_b:
            accepted = f"2..{groups_b}" if groups_b > 1 else "none (one B group: use preserve or paper)"
            raise RnnifyError(f"init merge_heads: --state-multiplier {mult} is more than the {groups_b} B/KV groups "
                              f"it merges; accepted: {accepted}")
        w_b, w_c = merged(w_b, groups_b, 1), merged(w_c, groups_c, step)
        cw_b, cw_c = merged(cw_b, groups_b, 1), merged(cw_c, groups_c, step)
        if cb_b is not None:
            cb_b, cb_c = merged(cb_b, groups_b, 1), merged(cb_c, groups_c, step)
    elif init == "paper":
        w_b, w_c = fresh(w_b, groups_b, bound), fresh(w_c, groups_c, bound)
        cw_b, cw_c = fresh(cw_b, groups_b, cbound), fresh(cw_c, groups_c, cbound)
        if cb_b is not None:
            cb_b, cb_c = fresh(cb_b, groups_b, cbound), fresh(cb_c, groups_c, cbound)
    else:
        b_new = {"merge_copy": "tile", "merge_zero": "zero", "preserve": "random"}[init]
        c_new = {"merge_copy": "tile", "merge_zero": "zero", "preserve": "zero"}[init]
        w_b, w_c = grow(w_b, groups_b, bound, b_new), grow(w_c, groups_c, bound, c_new)
        # preserve: the new conv channels copy the old ones of their group. A zero C conv channel after zero C rows
        # would pass no gradient to either (each one's gradient is the other's value): the new state would never
        # be read however long it trained
        conv_new = {"preserve": "tile"}.get(init)
        cw_b, cw_c = grow(cw_b, groups_b, cbound, conv_new or b_new), grow(cw_c, groups_c, cbound, conv_new or c_new)
        if cb_b is not None:  # preserve: a zero C channel must stay zero after the conv (silu(0) = 0)
            cb_b = grow(cb_b, groups_b, cbound, b_new)
            cb_c = grow(cb_c, groups_c, cbound, c_new)
    new_w = torch.cat([w_z, w_x, w_b, w_c, w_dt], 0)
    new_b = None
    if in_b is not None:
        b_z, b_x, b_b, b_c, b_dt = torch.split(in_b, [z, x, nb, nc, dt], 0)
        zeros = lambda t, g: t.new_zeros(g * n * mult)  # noqa: E731  (biases of new rows start at zero)
        if init in ("merge_copy",):
            b_b, b_c = grow(b_b, groups_b, 0, "tile"), grow(b_c, groups_c, 0, "tile")
        elif init == "merge_heads":
            b_b, b_c = merged(b_b, groups_b, 1), merged(b_c, groups_c, step)
        elif init == "paper":
            b_b, b_c = zeros(b_b, groups_b), zeros(b_c, groups_c)
        else:
            b_b, b_c = grow(b_b, groups_b, 0, "zero"), grow(b_c, groups_c, 0, "zero")
        new_b = torch.cat([b_z, b_x, b_b, b_c, b_dt], 0)
    new_cw = torch.cat([cw_x, cw_b, cw_c], 0)
    new_cb = None if conv_b is None else torch.cat([cb_x, cb_b, cb_c], 0)
    return new_w, new_b, new_cw, new_cb


def reset_decay(A_log, dt_bias, generator):
    """The paper's reset: A_log = log(1..H); dt_bias at Mamba2's initial distribution (dt log-uniform in
    [1e-3, 1e-1], stored through the inverse softplus)."""
    H = A_log.shape[0]
    with torch.no_grad():
        A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)).to(A_log))
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand(H, generator=generator) * (hi - lo) + lo).clamp_min(1e-4)
        dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(dt_bias))


class Statex(Transform):
    name = "statex"
    summary = "StateX: enlarge a recurrent model's state (merge linear-attention heads; multiply Mamba2 d_state)"
    paper = Paper("StateX: Enhancing RNN Recall via Post-training State Expansion (Shen et al., 2025)",
                  "https://arxiv.org/abs/2509.22630")
    Options = StatexOptions
    mixers = ()
    test_source = "supra"
    test_options = {"layers": "all", "init": "keep"}
    test_variants = {"paper": {"init": "paper"}}  # the merge inits need a Mamba2 source: tests/test_statex.py

    def accepts(self, source_config) -> bool:
        return getattr(source_config, "model_type", None) in ("rnnify", "mamba2")

    def apply(self, model, options):
        if model.config.model_type == "mamba2":
            return self._native_mamba2(model, options)

        n_layers = model.config.base_config.num_hidden_layers
        kinds = {i: _kind(m) for i, m in model.mixers()}
        candidates = [i for i, k in kinds.items() if k is not None]
        if not candidates:
            expandable = ", ".join(sorted(n for n, cls in MIXERS.items() if cls.state_expansion))
            raise RnnifyError("nothing to expand: the model has no recurrent state (mixers: "
                              f"{sorted({m for m in model.config.layer_mixers})}); statex expands {expandable} layers")
        chosen = pick_layers(candidates, options["layers"], n_layers)
        mixers = dict(model.mixers())
        for i in chosen:
            kind = kinds[i]
            if options["init"] not in INITS[kind]:
                raise RnnifyError(f"--init {options['init']}: layer {i} ({mixers[i].name}) accepts: "
                                  f"{', '.join(INITS[kind])}")
            if kind == "merge_heads" and mixers[i].merged:
                raise RnnifyError(f"layer {i}'s heads are already merged into one; choose other layers with --layers")
            if kind == "merge_heads" and options["state_multiplier"] is not None:
                raise RnnifyError("--state-multiplier applies to Mamba2 layers; merging heads grows the state by the "
                                  "head count")
            if kind == "d_state" and getattr(mixers[i], "q_norm", None) is not None:
                raise RnnifyError(f"layer {i} normalises C/B with the source's q_norm/k_norm over head_dim: its "
                                  "d_state cannot grow (sources without q/k norms: llama, mistral, qwen2)")
        mult = options["state_multiplier"] or 4
        program = [dict(s) for s in model.config.program]

        def rewrite(step):
            if step.get("layer") in chosen:
                settings = dict(step.get("settings", {}))
                if kinds[step["layer"]] == "merge_heads":
                    settings["merge_heads"] = True
                else:
                    settings["d_state"] = mixers[step["layer"]].d_state * mult
                return {**step, "settings": settings}
            return step

        program = [{**p, "block": [rewrite(s) for s in p["block"]]} if "block" in p else rewrite(p) for p in program]
        cfg = model.config.to_dict()
        cfg["program"] = program
        new_config = RnnifyConfig.from_dict(cfg)
        new_config._attn_implementation = model.config._attn_implementation
        dtype = next(model.parameters()).dtype
        if next(model.parameters()).is_meta:  # shapes only (a memory plan): nothing to carry over or initialise
            with torch.device("meta"):
                return RnnifyForCausalLM(new_config).to(dtype)
        out = RnnifyForCausalLM(new_config).to(dtype)
        sd = model.state_dict()
        g = torch.Generator().manual_seed(4000)
        for i in chosen:
            prefix = f"model.layers.{i}.self_attn."
            new_mixer = out.model.layers[i].self_attn
            if kinds[i] == "d_state":
                old = mixers[i]
                new_w, new_b, new_cw, new_cb = expand_bc(
                    old.in_proj.weight.detach(), None if old.in_proj.bias is None else old.in_proj.bias.detach(),
                    old.conv1d.weight.detach(), None if old.conv1d.bias is None else old.conv1d.bias.detach(),
                    {"z": old.d_inner, "x": old.d_xb, "dt": old.num_heads}, old.num_kv_heads, old.num_heads,
                    old.d_state, mult, options["init"], g)
                sd[prefix + "in_proj.weight"], sd[prefix + "conv1d.weight"] = new_w, new_cw
                if new_b is not None:
                    sd[prefix + "in_proj.bias"] = new_b
                if new_cb is not None:
                    sd[prefix + "conv1d.bias"] = new_cb
            for name, buf in new_mixer.named_buffers():  # a buffer sized by the heads (supra's fixed decays):
                if prefix + name in sd and sd[prefix + name].shape != buf.shape:  # the merged mixer's own
                    sd[prefix + name] = buf.detach().clone()
        missing, unexpected = out.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RnnifyError(f"statex: weights do not map (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for i in chosen:
                m = out.model.layers[i].self_attn
                if options["init"] != "paper":
                    continue
                if kinds[i] == "d_state":  # B/C are fresh already; the decay and the gated norm start anew
                    reset_decay(m.A_log, m.dt_bias, g)
                    m.norm.weight.fill_(1.0)
                elif m.can_run_as_source:  # q/k/v/o also serve the softmax window: only the memory starts afresh
                    m.init_new_parameters()
                else:  # the paper re-initialises a merged layer's mixer and its input norm
                    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                        lin = getattr(m, name)
                        lin.weight.normal_(0.0, 0.02, generator=g)
                        if lin.bias is not None:
                            lin.bias.zero_()
                    m.init_new_parameters()
                    out.model.layers[i].input_layernorm.weight.fill_(1.0)
        out.generation_config = model.generation_config
        return out.eval()

    def _native_mamba2(self, model, options):
        """transformers' Mamba2ForCausalLM: one state size for every layer (B/C per group ``n_groups``)."""
        cfg = model.config
        n = cfg.num_hidden_layers
        if options["layers"] not in (None, "all") and pick_layers(list(range(n)), options["layers"], n) != list(range(n)):
            raise RnnifyError("transformers' Mamba2ForCausalLM has one state size for every layer: give --layers all "
                              "(or leave --layers out)")
        if options["init"] not in INITS["d_state"]:
            raise RnnifyError(f"--init {options['init']}: Mamba2 layers accept: {', '.join(INITS['d_state'])}")
        mult = options["state_multiplier"] or 4
        new_cfg = type(cfg).from_dict({**cfg.to_dict(), "state_size": cfg.state_size * mult})
        out = Mamba2ForCausalLM(new_cfg).to(next(model.parameters()).dtype)
        sd = model.state_dict()
        g = torch.Generator().manual_seed(4000)
        inner = int(cfg.expand * cfg.hidden_size)
        for i, layer in enumerate(model.backbone.layers):
            mixer = layer.mixer
            prefix = f"backbone.layers.{i}.mixer."
            new_w, new_b, new_cw, new_cb = expand_bc(
                mixer.in_proj.weight.detach(), None if mixer.in_proj.bias is None else mixer.in_proj.bias.detach(),
                mixer.conv1d.weight.detach(), None if mixer.conv1d.bias is None else mixer.conv1d.bias.detach(),
                {"z": inner, "x": inner, "dt": cfg.num_heads}, cfg.n_groups, cfg.n_groups, cfg.state_size, mult,
                options["init"], g)
            sd[prefix + "in_proj.weight"], sd[prefix + "conv1d.weight"] = new_w, new_cw
            if new_b is not None:
                sd[prefix + "in_proj.bias"] = new_b
            if new_cb is not None:
                sd[prefix + "conv1d.bias"] = new_cb
        out.load_state_dict(sd, strict=True)
        if options["init"] == "paper":
            for layer in out.backbone.layers:
                reset_decay(layer.mixer.A_log, layer.mixer.dt_bias, g)
                with torch.no_grad():
                    layer.mixer.norm.weight.fill_(1.0)
        out.generation_config = model.generation_config
        return out.eval()


METHOD = Statex()
