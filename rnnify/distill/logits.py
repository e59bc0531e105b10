"""Distillation and fine-tuning losses computed a chunk of positions at a time, from the final hidden states.

A causal LM ends with ``logits = transform(head(h))``: ``h`` the final norm's output (N positions x d), ``head`` the
output embeddings, ``transform`` a soft-cap or scale where the architecture has one. For a vocabulary of V the
logits, and what a KL keeps for its backward pass (two log-softmaxes, an exp, a difference), are N x V floats each:
on SmolLM2-135M (V = 49,152) at 2048 tokens, 403 MB apiece, the larger part of a distillation step's memory.

Here the student runs with its head's forward swapped for one that takes the loss itself, from ``h``, while the
model's parameters are as its forward has them (under FSDP2: gathered): chunk by chunk of ``chunk`` positions it
builds the logits, takes the loss and its gradients with respect to the chunk's ``h`` and the head's trainable
parameters, and frees the chunk. The forward returns empty logits; the loss enters the graph through a function whose
backward pass hands out those gradients (the way fused linear cross-entropy kernels do it, e.g. Liger Kernel). Only
the positions that carry a loss are taken. Loss and gradients equal the whole computation's (``losses.py``) up to
the order of float sums; the tests compare the two.

Which ``transform`` a model applies is read from its config (``final_logit_softcapping``, ``logits_scaling``,
``logit_scale``) and checked once per model on a few positions against the model's own logits; a model whose logits
are not ``transform(head(h))`` (or whose forward does not call its head) is run whole instead, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .losses import kl_distill_loss, next_token_ce

CHECK_TOKENS = 8  # positions of the once-per-model check that transform(head(h)) is the model's logits


def logits_transform(model):
    """The map the model applies to ``head(h)``, from its config (an rnnify model's own, else its source's)."""
    config = model.config
    base = getattr(config, "base_config", None)

    def attr(name):
        value = getattr(config, name, None)
        return value if value is not None or base is None else getattr(base, name, None)

    cap, scaling, scale = attr("final_logit_softcapping"), attr("logits_scaling"), attr("logit_scale")

    def transform(x):
        if scale is not None:  # Cohere
            x = x * scale
        if scaling is not None:  # Granite
            x = x / scaling
        if cap:  # Gemma 2/3 (Gemma 2 report sec. 2: logits soft-capped at 30)
            x = torch.tanh(x / cap) * cap
        return x

    return transform


@dataclass
class TeacherOutputs:
    """A frozen forward's final hidden states and its head (``head`` None: ``rows`` are its whole logits)."""

    rows: torch.Tensor  # [B, L, d] hidden states, or [B, L, V] logits
    model: object = None
    head: object = None

    def logits(self, rows):
        if self.head is None:
            return rows
        params = dict(self.head.named_parameters())  # read now: inside a forward, as that forward has them
        return logits_transform(self.model)(functional_call(self.head, params, (rows,)))


class _HeadCapture:
    """While active, the head's forward calls ``on_hidden(h, params)`` with its input and the parameters it runs
    with, and returns what that gives."""

    def __init__(self, head, on_hidden):
        self.head, self.on_hidden, self.busy = head, on_hidden, False

    def __enter__(self):
        original = self.head.forward  # an instance's own forward (accelerate's hooks set one) is kept and restored
        self.saved = self.head.__dict__.get("forward")

        def forward(x, *args, **kwargs):
            if self.busy:  # the loss's own calls of the head (through functional_call): the head as it is
                return original(x, *args, **kwargs)
            self.busy = True
            try:
                return self.on_hidden(x, dict(self.head.named_parameters()), lambda: original(x, *args, **kwargs))
            finally:
                self.busy = False

        self.head.forward = forward  # an instance attribute: nn.Module.__call__ runs it, with the head's hooks
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            del self.head.forward
        else:
            self.head.forward = self.saved


class _GradientsTaken(torch.autograd.Function):
    """``value``, whose gradients with respect to ``inputs`` were taken in the forward pass: the backward pass scales
    them by the incoming gradient."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return (None, None, *[None if x is None else x * g for x in ctx.grads])


class VocabLoss:
    """KL to a teacher and next-token CE over a model's vocabulary, a chunk of ``chunk`` positions at a time
    (``None``: whole logits, the plain computation of ``losses.py``)."""

    def __init__(self, chunk: int | None):
        self.chunk = chunk
        self.checked: dict[int, bool] = {}  # id(model) -> its logits are transform(head(h))

    def teacher_outputs(self, model, input_ids, **kwargs) -> TeacherOutputs:
        """A frozen model's forward (call under ``torch.no_grad``): its final hidden states, or whole logits."""
        head = model.get_output_embeddings() if self.chunk else None
        if head is None or not self._head_matches(model, head, input_ids, kwargs):
            return TeacherOutputs(model(input_ids=input_ids, use_cache=False, **kwargs).logits)
        store = {}

        def keep(x, params, original):
            store["h"] = x
            return x[..., :0]

        with _HeadCapture(head, keep):
            out = model(input_ids=input_ids, use_cache=False, **kwargs)
        if "h" not in store:  # the forward did not call its head: it built its logits some other way
            return TeacherOutputs(out.logits)
        return TeacherOutputs(store["h"], model, head)

    def loss(self, model, input_ids, teacher: TeacherOutputs | None = None, *, kl_mask=None, labels=None,
             temperature: float = 1.0, direction: str = "forward", ce_weight: float = 1.0, **kwargs):
        """Run ``model`` on ``input_ids`` (``use_cache=False``, ``kwargs``) and return (loss, KL, CE): KL to the
        teacher over ``kl_mask``'s positions (None without a teacher), next-token CE on ``labels`` (None without
        labels), loss = KL + ``ce_weight`` * CE. Means and scaling as ``losses.kl_distill_loss`` and
        ``losses.next_token_ce``."""
        if direction not in ("forward", "reverse"):
            raise ValueError(f"kl direction {direction!r}; accepted: forward, reverse")
        head = model.get_output_embeddings() if self.chunk else None
        if head is None or not self._head_matches(model, head, input_ids, kwargs):
            logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
            return _whole(logits, teacher, kl_mask, labels, temperature, direction, ce_weight)
        store = {}

        def take_loss(x, params, original):
            store["out"] = self._chunked(x, params, head, model, teacher, kl_mask, labels, temperature, direction,
                                         ce_weight)
            return x[..., :0]

        with _HeadCapture(head, take_loss):
            out = model(input_ids=input_ids, use_cache=False, **kwargs)
        if "out" not in store:  # the forward did not call its head
            return _whole(out.logits, teacher, kl_mask, labels, temperature, direction, ce_weight)
        loss, kl, ce = store["out"]
        if out.logits.requires_grad:  # the forward's own (empty) logits in the graph with weight 0: hooks on the
            loss = loss + 0 * out.logits.sum()  # model's outputs run in the backward as usual (FSDP2's root unit)
        return loss, kl, ce

    def check(self, model, input_ids, **kwargs) -> None:
        """Run the once-per-model check now (before hooks that would see its forward are set)."""
        head = model.get_output_embeddings() if self.chunk else None
        if head is not None:
            self._head_matches(model, head, input_ids, kwargs)

    def _head_matches(self, model, head, input_ids, kwargs) -> bool:
        key = id(model)
        if key not in self.checked:
            if input_ids.is_meta:  # the memory plan: shapes only
                return True
            found = {}

            def compute(x, params, original):  # inside the forward: the parameters as it has them
                found["mine"] = _logits_of(model, head, params)(x)
                return original()

            with torch.no_grad(), torch.random.fork_rng(), _HeadCapture(head, compute):
                logits = model(input_ids=input_ids[:1, :CHECK_TOKENS], use_cache=False, **kwargs).logits
            found["ok"] = "mine" in found and found["mine"].shape == logits.shape and torch.allclose(
                logits.float(), found["mine"].float(), rtol=1e-4, atol=1e-4)
            if not found.get("ok"):
                warnings.warn(f"{type(model).__name__}: its logits are not its output head's of its final hidden "
                              "states (an unknown logit transform); computing whole logits for it (more memory)",
                              stacklevel=3)
            self.checked[key] = bool(found.get("ok"))
        return self.checked[key]

    def _chunked(self, hidden, params, head, model, teacher, kl_mask, labels, temperature, direction, ce_weight):
        B, L, d = hidden.shape
        n = B * L
        h_rows = hidden.reshape(n, d)
        t_rows = teacher.rows.reshape(n, -1) if teacher is not None else None
        km = None
        if teacher is not None:
            km = torch.ones(n, dtype=torch.bool, device=hidden.device) if kl_mask is None else kl_mask.reshape(n)
        targets = None
        if labels is not None:  # position t predicts labels[t + 1]; the last position predicts nothing
            targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), -100)], dim=1).reshape(n)
        wanted = km.clone() if km is not None else torch.zeros(n, dtype=torch.bool, device=hidden.device)
        if targets is not None:
            wanted |= targets != -100
        rows = wanted.nonzero().squeeze(1)
        kl_den = km.sum().clamp_min(1) if km is not None else None
        ce_den = (targets != -100).sum() if targets is not None else None  # 0: NaN, as F.cross_entropy's mean
        weights = dict(params)
        trained = [k for k, p in weights.items() if p.requires_grad]
        head_logits = _logits_of(model, head, weights)
        grad_h = torch.zeros_like(h_rows, dtype=torch.float32) if hidden.requires_grad else None
        grad_p = {k: None for k in trained}
        kl_total = h_rows.new_zeros((), dtype=torch.float32)
        ce_total = h_rows.new_zeros((), dtype=torch.float32)
        for a in range(0, rows.numel(), self.chunk):
            r = rows[a:a + self.chunk]
            with torch.enable_grad():
                h = h_rows.index_select(0, r).detach().requires_grad_(grad_h is not None)
                s = head_logits(h).float()
                part = s.new_zeros(())
                if teacher is not None:
                    with torch.no_grad():
                        t = F.log_softmax(teacher.logits(t_rows.index_select(0, r)).float() / temperature, dim=-1)
                    ls = F.log_softmax(s / temperature, dim=-1)
                    kl = (t.exp() * (t - ls)).sum(-1) if direction == "forward" else (ls.exp() * (ls - t)).sum(-1)
                    kl = (kl * km.index_select(0, r).to(kl.dtype)).sum() / kl_den * temperature**2
                    kl_total = kl_total + kl.detach()
                    part = part + kl
                if targets is not None:
                    ce = F.cross_entropy(s, targets.index_select(0, r), ignore_index=-100, reduction="sum") / ce_den
                    ce_total = ce_total + ce.detach()
                    part = part + (ce_weight if teacher is not None else 1.0) * ce
                wrt = ([h] if grad_h is not None else []) + [weights[k] for k in trained]
                grads = torch.autograd.grad(part, wrt, allow_unused=True) if wrt and part.requires_grad else []
            if grad_h is not None and grads:
                grad_h.index_copy_(0, r, grads[0].float())
                grads = grads[1:]
            for k, g in zip(trained, grads):
                if g is not None:
                    grad_p[k] = g if grad_p[k] is None else grad_p[k] + g
        kl = kl_total if teacher is not None else None
        ce = ce_total if targets is not None else None
        value = (kl if kl is not None else 0) + ((ce_weight if teacher is not None else 1.0) * ce if ce is not None
                                                 else 0)
        value = value if torch.is_tensor(value) else h_rows.new_zeros((), dtype=torch.float32)
        inputs = [hidden] + [weights[k] for k in trained]
        grads = [None if grad_h is None else grad_h.reshape(B, L, d).to(hidden.dtype)] + [
            torch.zeros_like(weights[k]) if grad_p[k] is None else grad_p[k] for k in trained]
        return _GradientsTaken.apply(value, grads, *inputs), kl, ce


def _logits_of(model, head, params):
    transform = logits_transform(model)
    return lambda h: transform(functional_call(head, params, (h,)))


def _whole(logits, teacher, kl_mask, labels, temperature, direction, ce_weight):
    kl = None if teacher is None else kl_distill_loss(logits, teacher.logits(teacher.rows), kl_mask, temperature,
                                                      direction)
    ce = None if labels is None else next_token_ce(logits, labels)
    if kl is None:
        return ce, None, ce
    return (kl if ce is None else kl + ce_weight * ce), kl, ce


__all__ = ["TeacherOutputs", "VocabLoss", "logits_transform"]
