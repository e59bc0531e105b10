"""Generation-based checks against the teacher: what perplexity averages away shows up in what the model says.

* next-token agreement: over held-out text, the share of positions where the student's greedy next token is the
  teacher's (both read the same true prefix); computed in ``report.evaluate`` from the argmax its perplexity pass
  already keeps, so the text is read once;
* continuation agreement: from prompts cut out of the held-out text, greedy continuations of N tokens by both; the
  share that are identical, and the mean length of their common prefix.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return out[0, prompt.numel():]


def continuation_agreement(student, teacher, tokens: torch.Tensor, prompts: int = 8, prompt_len: int = 256,
                           new_tokens: int = 16, pad_token_id: int = 0) -> dict:
    """Greedy continuations of ``new_tokens`` after ``prompts`` prompts of ``prompt_len`` tokens spread over
    ``tokens`` (a 1-D stream)."""
    span = tokens.numel() - prompt_len
    if span <= 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one prompt of {prompt_len}")
    starts = [int(i * span / prompts) for i in range(prompts)]
    identical, common = 0, 0.0
    for a in starts:
        prompt = tokens[a : a + prompt_len]
        s, t = greedy(student, prompt, new_tokens, pad_token_id), greedy(teacher, prompt, new_tokens, pad_token_id)
        n = min(s.numel(), t.numel())
        diff = (s[:n] != t[:n]).nonzero()
        prefix = n if diff.numel() == 0 else int(diff[0])
        identical += prefix == n == new_tokens
        common += prefix
    return {"identical": identical / prompts, "mean_common_prefix": common / prompts, "prompts": prompts,
            "prompt_tokens": prompt_len, "new_tokens": new_tokens}


__all__ = ["continuation_agreement", "greedy"]
