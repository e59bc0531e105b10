"""Which layers stay attention, chosen by measurement: each layer is scored by what converting it costs the model,
inference only, on a few thousand tokens of text.

Two scores (both as KL(teacher || model) of the next-token distributions, averaged over tokens):

- ``restore`` (the default): start from the model with every layer converted and restore one layer at a time to the
  teacher's attention; a layer's score is how much the KL falls. This is KL-guided layer selection: it measures each
  layer in the setting the hybrid will live in (mostly converted), where errors of earlier layers compound, so it
  finds the layers whose attention the rest of the network depends on.
- ``convert``: start from the teacher and convert one layer at a time; the score is how much the KL rises. Cheaper
  to read (each layer alone against the exact teacher) but blind to interactions between converted layers.

Forward passes are reused: one pass of the base model (the all-converted student for ``restore``, the teacher for
``convert``) records every decoder layer's output; scoring layer ``i`` then replays layers ``< i`` from that record
(their forward is replaced by the recorded output) and computes only layers ``i ..``, so the whole scan costs about
half a forward pass per layer instead of one.

Caveat, measured on SmolLM2-135M: for LoLCATs (whose untrained hybrid is close to the window-only model) the
selected layers beat evenly spread ones at every budget; for Mamba-in-the-Llama, whose untrained hybrid is far from
the teacher (perplexity ~1e5), neither mode's scores of the untrained model gave a better hybrid after the CPU
recipe's short training than spreading: score such methods after a short training instead, with the recipe key
``conversion.select_after: <stage>`` (every layer is converted until that stage has run, its trained model is
scored, and the chosen layers return to the teacher's attention for the later stages; ``select_trained``). An
``attention_transfer`` stage is the natural one: it trains each layer alone on the teacher's inputs, so what it
learns does not depend on which layers are kept.

A plan is the top ``N`` layers by score, or, for a cache budget (``auto:10%@4096``: at most 10% of the teacher's
KV cache at 4096 tokens), the most layers whose cache fits. Scores are cached on disk per source weights, method,
options, text and mode, so a recipe rerun does not rescore.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import sources
from ..cache_size import attention_cache_bytes, cache_bytes
from ..errors import RnnifyError
from ..io import write_json_atomic
from ..modeling.configuration_rnnify import base_layer_types
from ..paths import resolve_path
from ..units import human_bytes
from .auto_spec import AutoSpec
from .build import build_converted
from .registry import get_method
from .teacher_attention import TeacherAttention

MODES = ("restore", "convert")
DEFAULT_TEXT = "builtin:wikitext-2/valid.txt"
SCORE_SEQ_LEN = 1024  # scoring sequences: long enough for the window/memory mixers to differ from attention
MIN_SCORE_TOKENS = 64


# ------------------------------------------------------------------------------------------------ scoring
class _ConvertedInTeacher(torch.nn.Module):
    """A converted mixer standing in for a teacher layer's attention (``convert`` scores): same call, no mask or
    cache (the mixer is causal by construction)."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = [mixer]  # not registered: the teacher's modules stay the teacher's

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        out = self.mixer[0](hidden_states, position_embeddings=position_embeddings, attention_mask=None)
        return out if isinstance(out, tuple) else (out, None)


@contextlib.contextmanager
def _swapped(layer, attn):
    saved = layer.self_attn
    layer.self_attn = attn
    try:
        yield
    finally:
        layer.self_attn = saved


@contextlib.contextmanager
def _replaying(layers, outputs):
    """Layers whose forward returns their recorded output instead of computing it."""
    for layer, out in zip(layers, outputs):
        layer.forward = lambda *a, _out=out, **k: _out
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _record_outputs(model, ids) -> tuple[list, torch.Tensor]:
    layers = model.model.layers
    outs = [None] * len(layers)
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i, layer in
             enumerate(layers)]
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


def _kl(teacher_logp, logits) -> float:
    """Mean over tokens of KL(teacher || model)."""
    s = F.log_softmax(logits.float(), -1)
    return float((teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean())


@torch.no_grad()
def score_layers(teacher, student, ids: torch.Tensor, mode: str = "restore", progress=None) -> list[float]:
    """Per layer, the KL change of converting it (``convert``) or restoring it (``restore``); higher = keep it as
    attention. ``student``: ``teacher`` converted with every layer converted; ``ids``: ``[sequences, length]``."""
    if mode not in MODES:
        raise RnnifyError(f"layer score mode {mode!r}; accepted: {', '.join(MODES)}")
    n = len(teacher.model.layers)
    if len(student.model.layers) != n or len(list(student.program)) != n:
        raise RnnifyError("layer selection needs a conversion with one step per source layer (no loops, no dropped "
                          "layers)")
    converted = dict(student.mixers())
    if len(converted) != n:
        raise RnnifyError("layer selection scores a model with every layer converted; this method kept some layers")
    base, layers = (student, student.model.layers) if mode == "restore" else (teacher, teacher.model.layers)
    totals = [0.0] * n
    for s in range(ids.shape[0]):
        x = ids[s : s + 1]
        t_logp = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
        outs, base_logits = _record_outputs(base, x)
        base_kl = _kl(t_logp, base_logits)
        for i in range(n):
            donor = TeacherAttention(teacher.model.layers[i].self_attn) if mode == "restore" \
                else _ConvertedInTeacher(converted[i])
            with _replaying(layers[:i], outs[:i]), _swapped(layers[i], donor):
                kl = _kl(t_logp, base(input_ids=x, use_cache=False).logits)
            totals[i] += (base_kl - kl) if mode == "restore" else (kl - base_kl)
            if progress:
                progress(s * n + i + 1, ids.shape[0] * n)
    return [v / ids.shape[0] for v in totals]


# ------------------------------------------------------------------------------------------------ plans
def plan_cache_bytes(student, keep: list[int], seq_len: int, kv_bytes: int = 2) -> int:
    """Cache bytes at ``seq_len`` of the hybrid keeping ``keep`` as attention (``student``: all converted)."""
    base = student.config.base_config
    types = base_layer_types(base)
    total = 0
    for i, mixer in student.mixers():
        total += attention_cache_bytes(base, types[i], seq_len, 1, kv_bytes) if i in keep \
            else mixer.cache_bytes(seq_len, 1, kv_bytes)
    return total


def keep_for_budget(scores: list[float], spec: AutoSpec, student=None, teacher_cache: int | None = None) -> list[int]:
    """The kept layers for ``spec``: the top-N by score (ties: the lower layer), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if spec.layers is not None:
        if spec.layers > len(scores):
            raise RnnifyError(f"keep-attention auto:{spec.layers}: the model has {len(scores)} layers")
        return sorted(order[: spec.layers])
    budget = spec.cache_fraction * teacher_cache
    smallest = plan_cache_bytes(student, [], spec.cache_length)
    if smallest > budget:
        raise RnnifyError(
            f"keep-attention {spec}: no plan meets a cache of {human_bytes(budget, digits=2)} at {spec.cache_length} tokens; "
            f"the smallest possible (every layer converted) is {human_bytes(smallest, digits=2)} = "
            f"{100 * smallest / teacher_cache:.1f}% of the teacher's {human_bytes(teacher_cache, digits=2)}")
    keep: list[int] = []
    for i in order:
        if plan_cache_bytes(student, keep + [i], spec.cache_length) > budget:
            break
        keep.append(i)
    return sorted(keep)


# ------------------------------------------------------------------------------------------------ text, cache
def text_ids(tokenizer, text: str = DEFAULT_TEXT, tokens: int = 4096, seq_len: int | None = None) -> torch.Tensor:
    """``tokens`` tokens of ``text`` (a file or builtin:...) as ``[tokens // seq_len, seq_len]`` (``seq_len``: the
    smaller of ``tokens`` and ``SCORE_SEQ_LEN`` unless given)."""
    seq_len = min(tokens, SCORE_SEQ_LEN) if seq_len is None else seq_len
    if tokens < MIN_SCORE_TOKENS or seq_len < 1:
        raise RnnifyError(f"scoring on {tokens} tokens in sequences of {seq_len}: accepted: at least "
                          f"{MIN_SCORE_TOKENS} tokens and a sequence length >= 1")
    if seq_len > tokens:
        raise RnnifyError(f"scoring on {tokens} tokens in sequences of {seq_len}: accepted: a sequence length at "
                          f"most the token count (leave it out for min(tokens, {SCORE_SEQ_LEN}))")

    path = Path(resolve_path(text))
    if not path.is_file():
        raise RnnifyError(f"scoring text {text}: no such file; give a text file or builtin:wikitext-2/valid.txt")
    ids: list[int] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                ids += tokenizer(line, add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                break
    n = min(tokens, len(ids)) // seq_len
    if n < 1:
        raise RnnifyError(f"scoring text {text}: {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _progress(log):
    """A score_layers progress callback that logs every 10%."""
    last = [0]

    def progress(done, total):
        pct = int(100 * done / total)
        if pct >= last[0] + 10:
            last[0] = pct
            log(f"  {pct}%")

    return progress


def _fingerprint(teacher, method, options, ids, mode) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"method": method, "options": options, "mode": mode}, sort_keys=True, default=str).encode())
    for name, p in teacher.named_parameters():  # shapes of all, a sample of the values of each
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().flatten()[:: max(1, p.numel() // 64)][:64].float().numpy().tobytes())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:24]


def cached_scores(teacher, method: str, options: dict, tokenizer, text: str = DEFAULT_TEXT, mode: str = "restore",
                  tokens: int = 4096, seq_len: int | None = None, log=print, seed: int = 0) -> tuple[list[float], object]:
    """(per-layer scores, the all-converted student), from the on-disk cache when this source, method, options,
    text and mode were scored before."""
    options = get_method(method).resolve_options(options)  # the same choice keys the same cache entry
    ids = text_ids(tokenizer, text, tokens, seq_len)
    torch.manual_seed(seed)  # the new parameters' initialisation: the scores are deterministic for a seed
    student = build_converted(teacher, method, [], options)
    path = sources.cache_root() / "layer_scores" / f"{_fingerprint(teacher, method, options, ids, mode + str(seed))}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if len(data["scores"]) == len(teacher.model.layers):
                log(f"layer scores ({mode}) from the cache: {path}")
                return data["scores"], student
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    log(f"scoring {len(teacher.model.layers)} layers ({mode}) on {ids.numel():,} tokens of {text} ...")
    scores = score_layers(teacher, student, ids, mode, _progress(log))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"method": method, "options": options, "mode": mode, "text": text,
                             "tokens": ids.numel(), "scores": scores})
    return scores, student


def teacher_cache_bytes(teacher, seq_len: int) -> int:
    return cache_bytes(teacher, seq_len)


def select_trained(teacher, student, spec: AutoSpec, tokenizer, text: str = DEFAULT_TEXT, mode: str = "restore",
                   tokens: int = 4096, log=print) -> tuple[list[int], list[float]]:
    """(kept layers, scores) for ``spec``, scored on ``student``: a *trained* model with every layer converted
    (recipe ``select_after``). Not cached: the scores belong to these trained weights. For methods whose untrained
    hybrid is far from the teacher (Mamba-in-the-Llama) this is what makes the scores mean something."""
    ids = text_ids(tokenizer, text, tokens).to(next(student.parameters()).device)
    log(f"scoring {len(teacher.model.layers)} trained layers ({mode}) on {ids.numel():,} tokens of {text} ...")
    was_training = student.training
    student.eval()
    scores = score_layers(teacher, student, ids, mode, _progress(log))
    student.train(was_training)
    if any(math.isnan(s) for s in scores):
        raise RnnifyError("layer scores are NaN: the trained model's outputs are not finite on this text")
    return keep_for_budget(scores, spec, student, teacher_cache_bytes(teacher, spec.cache_length)), scores


def resolve_auto(teacher, method: str, spec: AutoSpec, options: dict, tokenizer, text: str = DEFAULT_TEXT,
                 mode: str = "restore", tokens: int = 4096, log=print) -> tuple[list[int], list[float]]:
    """(kept layers, scores) for an ``auto`` keep-attention value, scored on ``tokens`` tokens of ``text``."""
    scores, student = cached_scores(teacher, method, options, tokenizer, text, mode, tokens, log=log)
    keep = keep_for_budget(scores, spec, student, teacher_cache_bytes(teacher, spec.cache_length))
    if any(math.isnan(s) for s in scores):
        raise RnnifyError("layer scores are NaN: the converted model's outputs are not finite on this text")
    return keep, scores
