"""Losses of the training stages."""

from __future__ import annotations

import torch.nn.functional as F


def kl_distill_loss(student_logits, teacher_logits, mask=None, temperature: float = 1.0, direction: str = "forward"):
    """Per-token KL between teacher and student next-token distributions, averaged over unmasked positions.

    forward = KL(teacher || student) (mean-seeking, the usual distillation loss); reverse = KL(student ||
    teacher) (mode-seeking, MiniLLM). Scaled by T^2 so gradients keep their size across temperatures
    (Hinton et al. 2015).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"kl direction {direction!r}; accepted: forward, reverse")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "forward":
        kl = (t.exp() * (t - s)).sum(-1)
    else:
        kl = (s.exp() * (s - t)).sum(-1)
    if mask is not None:
        mask = mask.to(kl.dtype)
        return (kl * mask).sum() / mask.sum().clamp_min(1) * temperature**2
    return kl.mean() * temperature**2


def next_token_ce(logits, labels, ignore_index: int = -100):
    """Causal LM cross-entropy: position t predicts labels[t + 1]; -100 labels are ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=ignore_index
    )
